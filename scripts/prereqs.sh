# Sourced by the scripts in this folder: checks for what the build and tests need and installs it
# where it can (Debian, as root), or says clearly what is missing.

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found: install the Rust toolchain (https://rustup.rs) and retry" >&2
    exit 1
  fi
}

need_cargo_component() {
  # need_cargo_component COMPONENT SUBCOMMAND: e.g. rustfmt fmt, for `cargo fmt`.
  if cargo "$2" --version >/dev/null 2>&1; then return; fi
  if command -v rustup >/dev/null 2>&1; then
    echo "installing $1 with rustup" >&2
    rustup component add "$1" >&2 || { echo "error: rustup component add $1 failed" >&2; exit 1; }
  else
    echo "error: cargo $2 not found: install $1 (rustup component add $1) and retry" >&2
    exit 1
  fi
}

apt_install() {
  # apt_install PACKAGE...: installs Debian packages when we can, else explains how.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $* with apt-get" >&2
    if [ -z "${ROLLGATE_APT_UPDATED:-}" ]; then
      apt-get update -qq >&2 || { echo "error: apt-get update failed" >&2; exit 1; }
      ROLLGATE_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 \
      || { echo "error: apt-get install $* failed" >&2; exit 1; }
  else
    echo "error: missing $*: install it (Debian/Ubuntu: sudo apt-get install $*) and retry" >&2
    exit 1
  fi
}

need_protoc() {
  if [ -n "${PROTOC:-}" ] && [ -x "${PROTOC}" ]; then return; fi
  command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
  command -v protoc >/dev/null 2>&1 || { echo "error: protoc still not found after install" >&2; exit 1; }
}

need_etcd() {
  # etcd (Debian: etcd-server) runs the coordinator's store tests and the --etcd demo.
  if command -v etcd >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt_install etcd-server
    # The package may try to start a system etcd; the tests start their own on free ports.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop etcd >/dev/null 2>&1 || true; fi
  elif [ "${CI:-}" = true ]; then
    echo "error: etcd not found and CI=true: install etcd-server" >&2
    exit 1
  else
    echo "warning: etcd not found: tests that need it will be skipped (Debian: sudo apt-get install etcd-server)" >&2
  fi
}

need_chromium() {
  # Chromium (Debian: chromium) runs the browser tests, headless: rollgate_tests::browser.
  # ROLLGATE_CHROMIUM names another build to use instead of `chromium` on PATH.
  if [ -n "${ROLLGATE_CHROMIUM:-}" ]; then
    [ -x "$ROLLGATE_CHROMIUM" ] && return
    echo "error: ROLLGATE_CHROMIUM=$ROLLGATE_CHROMIUM is not an executable file" >&2
    exit 1
  fi
  if command -v chromium >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt_install chromium
    command -v chromium >/dev/null 2>&1 || { echo "error: chromium still not found after install" >&2; exit 1; }
  elif [ "${CI:-}" = true ]; then
    echo "error: chromium not found and CI=true: install chromium" >&2
    exit 1
  else
    echo "warning: chromium not found: tests that need it will be skipped (Debian: sudo apt-get install chromium)" >&2
  fi
}
