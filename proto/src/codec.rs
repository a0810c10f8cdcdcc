//! The agent service's codec: prost, with smaller buffers than tonic's default.
//!
//! A coordinator keeps one `Watch` stream open per agent, and tonic gives each stream a decode
//! buffer of its codec's size for its whole life: 8 KiB by default, about 8 MB per 1,000
//! agents on every coordinator (a heap profile, BENCHMARKS.md "Where B3's memory goes"). The
//! agent's messages are a few hundred bytes, so 1 KiB is enough; a larger message grows the
//! buffer as it would anyway.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Bytes a stream's encode and decode buffers start with.
pub const BUFFER_SIZE: usize = 1024;

/// How much an encoder writes before it yields to other tasks (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone)]
pub struct SmallCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::Decoder;

    #[test]
    fn buffers_start_small() {
        let mut c = SmallCodec::<(), ()>::default();
        assert_eq!(
            format!("{:?}", c.decoder().buffer_settings()),
            format!("{:?}", BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        );
    }
}
