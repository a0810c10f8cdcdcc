//! How a batch of history events is packed into bytes: deflate, primed with a preset
//! dictionary of what batches are made of.
//!
//! Why a dictionary: a batch is small (one server's chain, most often) and plain deflate has
//! nothing to refer back to in a short input, so it shrank batches only to 300–400 bytes. The
//! kinds, field names and message templates are the same in every batch: with them already in
//! the window, a batch refers back into the dictionary instead of spelling them out (B7: the
//! history is most of the bytes an upgrade stores).
//!
//! How, with a deflate library that has no dictionary call: the compressor is fed the
//! dictionary, flushed to a byte boundary (its output dropped), then fed the batch; only the
//! batch's blocks are stored. To read, those blocks are appended to the dictionary written as
//! stored (uncompressed) blocks, the whole is inflated and the dictionary cut off the front.
//! Only the standard format is relied on to read: a later compressor may pack the batch
//! differently, and every stored value still inflates.
//!
//! The dictionary is part of the stored format: it must never change. A different one would
//! get a marker byte of its own, with this one kept to read what was written with it.

use miniz_oxide::deflate::core::{
    compress_to_output, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

/// The first byte of a batch deflated without a dictionary (the first packed format).
pub const DEFLATED: u8 = 0x01;

/// The first byte of a batch deflated after [`DICTIONARY_1`].
pub const DEFLATED_DICT_1: u8 = 0x02;

/// A batch inflates to at most this much: far above any batch written, low enough that a
/// damaged value cannot exhaust memory.
pub const MAX_INFLATED: usize = 16 << 20;

/// Typical batch content, the most frequent strings last (deflate codes near references in
/// fewer bits). Real agents' messages and the fleet simulator's are both here.
const DICTIONARY_1: &str = concat!(
    r#"{"plan":"","epoch":1,"by":"coordinator-1","events":["#,
    r#"{"q":1,"t":1800000000000,"k":"upgrade_requested","m":"upgrade to version requested by operator/"},"#,
    r#"{"k":"rollback_started","m":"rollback requested by "},{"k":"domain_rolled_back","m":"domain rolled back"},"#,
    r#"{"k":"step_failed","m":"failed (attempt 1): command exited with exit status: 1"},"#,
    r#"{"k":"step_unanswered","m":"no answer: agent unreachable"},{"k":"step_retried"},"#,
    r#"{"k":"paused","m":"paused by operator/"},{"k":"resumed","m":"resumed by operator/"},"#,
    r#"{"k":"aborted","m":"aborted by operator/"},{"k":"server_failed"},"#,
    r#"{"k":"readiness_busy","m":"pool busy: "},{"k":"readiness_insufficient_active_front_ends","m":"servers active, min_active "},"#,
    r#"{"k":"soak_started","m":"canary soak for "},{"k":"soak_done"},{"k":"awaiting_window"},"#,
    r#"{"k":"failover_succeeded"},{"k":"failover_failed"},"#,
    r#"{"k":"completed","m":"every domain upgraded"},"#,
    r#"{"k":"domain_started","d":"ud-1","m":"domain upgrade started"},"#,
    r#"{"k":"domain_completed","d":"ud-1","m":"domain upgraded"},"#,
    r#"{"k":"step_started","s":"fe-01","d":"ud-1","m":"prepare started (attempt 1, op /fe-01/fwd/prepare/1)"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"prepare succeeded (attempt 1): prepared: the artifact of version 2.0 (sha256 ) is verified in the cache; nothing was installed"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"prepare succeeded (attempt 1): artifact verified"},"#,
    r#"{"k":"readiness_ready","s":"fe-01","d":"ud-1","m":"pool ready: 10 of 10 servers active, min_active 4; ud-1: 4 active server(s) stay outside ud-1 (min_active 4)"},"#,
    r#"{"k":"step_started","s":"fe-01","d":"ud-1","m":"drain started (attempt 1, op /fe-01/fwd/drain/1)"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"drain succeeded (attempt 1): drained: no connections left; stopped"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"drain succeeded (attempt 1): drained"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"install succeeded (attempt 1): installed version 2.0"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"install succeeded (attempt 1): installed 2.0"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"restart succeeded (attempt 1): started: accepting connections"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"verify succeeded (attempt 1): verified: accepting, healthy and not busy for 1000ms; version 2.0"},"#,
    r#"{"k":"step_succeeded","s":"fe-01","d":"ud-1","m":"verify succeeded (attempt 1): verified 2.0"},"#,
    r#"{"q":2,"t":1800000000000,"k":"server_done","s":"fe-01","d":"ud-1","m":"server upgraded"}]}"#,
);

/// Packs `json`: deflated after the dictionary, or as it is when that is not shorter.
pub fn pack(json: Vec<u8>) -> Vec<u8> {
    match deflate_after(DICTIONARY_1.as_bytes(), &json) {
        Some(deflated) if deflated.len() + 1 < json.len() => {
            let mut out = Vec::with_capacity(deflated.len() + 1);
            out.push(DEFLATED_DICT_1);
            out.extend_from_slice(&deflated);
            out
        }
        _ => json,
    }
}

/// What [`pack`] packed (or a value of an earlier format): the JSON, borrowed when it was
/// stored as it is.
pub fn unpack(value: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    match value.split_first() {
        Some((&DEFLATED, deflated)) => {
            miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, MAX_INFLATED)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| format!("a deflated event batch does not inflate: {e}"))
        }
        Some((&DEFLATED_DICT_1, deflated)) => inflate_after(DICTIONARY_1.as_bytes(), deflated)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| format!("a deflated event batch does not inflate: {e}")),
        _ => Ok(std::borrow::Cow::Borrowed(value)),
    }
}

/// Raw deflate of `data` with `dict` in the window before it: the blocks after the
/// dictionary's, which start on a byte boundary (a sync flush ends the dictionary's).
fn deflate_after(dict: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    // Level 6, raw deflate (no zlib header), the default strategy.
    let mut compressor = CompressorOxide::new(create_comp_flags_from_zip_params(6, 0, 0));
    let (status, read) = compress_to_output(&mut compressor, dict, TDEFLFlush::Sync, |_| true);
    if status != TDEFLStatus::Okay || read != dict.len() {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 16);
    let (status, read) = compress_to_output(&mut compressor, data, TDEFLFlush::Finish, |b| {
        out.extend_from_slice(b);
        true
    });
    (status == TDEFLStatus::Done && read == data.len()).then_some(out)
}

/// Inflates what [`deflate_after`] made with the same `dict`.
fn inflate_after(dict: &[u8], deflated: &[u8]) -> Result<Vec<u8>, String> {
    // The dictionary as non-final stored blocks (BFINAL 0, BTYPE 00, then LEN and its
    // complement, little-endian): a decoder copies them to its window as they are.
    let mut stream = Vec::with_capacity(dict.len() + deflated.len() + 16);
    for chunk in dict.chunks(usize::from(u16::MAX)) {
        let len = u16::try_from(chunk.len()).map_err(|_| "dictionary chunk too long")?;
        stream.push(0);
        stream.extend_from_slice(&len.to_le_bytes());
        stream.extend_from_slice(&(!len).to_le_bytes());
        stream.extend_from_slice(chunk);
    }
    stream.extend_from_slice(deflated);
    let mut out =
        miniz_oxide::inflate::decompress_to_vec_with_limit(&stream, MAX_INFLATED + dict.len())
            .map_err(|e| e.to_string())?;
    if !out.starts_with(dict) {
        return Err("the dictionary did not come back first".into());
    }
    out.drain(..dict.len());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(servers: usize) -> Vec<u8> {
        let mut events = Vec::new();
        for i in 0..servers {
            for (k, m) in [
                (
                    "step_succeeded",
                    "prepare succeeded (attempt 1): artifact verified",
                ),
                ("step_succeeded", "drain succeeded (attempt 1): drained"),
                (
                    "step_succeeded",
                    "install succeeded (attempt 1): installed 2.0",
                ),
                ("server_done", "server upgraded"),
            ] {
                events.push(format!(
                    r#"{{"q":{i},"t":18000000{i:05},"k":"{k}","s":"fe-{i:02}","d":"ud-1","m":"{m}"}}"#
                ));
            }
        }
        format!(
            r#"{{"plan":"pool-a-1800000000500","epoch":3,"by":"c0","events":[{}]}}"#,
            events.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn a_packed_batch_unpacks_to_itself_and_the_dictionary_makes_it_smaller() {
        for servers in [1, 3, 40] {
            let json = batch(servers);
            let packed = pack(json.clone());
            assert_eq!(packed.first(), Some(&DEFLATED_DICT_1));
            assert_eq!(unpack(&packed).expect("unpacks").as_ref(), json.as_slice());
            let plain = miniz_oxide::deflate::compress_to_vec(&json, 6).len() + 1;
            eprintln!(
                "{servers} server(s): {} B JSON, {plain} B deflated, {} B with the dictionary",
                json.len(),
                packed.len()
            );
            assert!(
                packed.len() * 2 <= plain || servers > 3,
                "{} B with the dictionary against {plain} without",
                packed.len()
            );
            assert!(packed.len() <= plain, "{} > {plain}", packed.len());
        }
    }

    #[test]
    fn earlier_formats_still_read_and_damage_is_an_error() {
        let json = batch(2);
        // The first packed format: plain deflate after 0x01.
        let mut old = vec![DEFLATED];
        old.extend(miniz_oxide::deflate::compress_to_vec(&json, 6));
        assert_eq!(unpack(&old).expect("old format").as_ref(), json.as_slice());
        // Plain JSON, from before batches were packed.
        assert_eq!(unpack(&json).expect("json").as_ref(), json.as_slice());
        // A value that stops short does not inflate.
        let packed = pack(json);
        let cut = packed.get(..packed.len() / 2).expect("half");
        assert!(unpack(cut).is_err());
        // Tiny input is kept as it is: nothing to gain.
        assert_eq!(pack(b"{}".to_vec()), b"{}".to_vec());
    }

    /// A batch packed with dictionary 1 when the format was made (2026-11-30): such values
    /// stay in stores, so this must read for good. A changed dictionary fails it.
    #[test]
    fn a_batch_packed_with_dictionary_1_reads_back_for_good() {
        const PACKED: &str = "02ad96c10900200c03272a1c88033987cb8b8fd287562a6481a62424dc747c\
                              db9b61c3e27c8740bae648c7c171a46f656e20da459578b9b32ac1ef8a3d85\
                              afe9534a7f01";
        let bytes: Vec<u8> = (0..PACKED.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&PACKED[i..i + 2], 16).expect("hex"))
            .collect();
        assert_eq!(
            unpack(&bytes).expect("unpacks").as_ref(),
            batch(1).as_slice()
        );
    }
}
