//! The one codec facade: bincode 2 (`config::standard()`) behind length-prefixed frames.
//!
//! A frame is `magic (4) | version (u16 BE) | payload length (u32 BE) | payload`. Decoding never
//! panics: bad magic, an unknown version, an oversized length, a malformed or trailing payload
//! are all [`CodecError`]s. Switching the payload format is a change to this file only.

use serde::{de::DeserializeOwned, Serialize};

/// Frame magic: "IMGO".
pub const MAGIC: [u8; 4] = *b"IMGO";
/// Wire protocol version this build writes. It reads every version from
/// [`PROTOCOL_VERSION_MIN`] to this one, and refuses a newer one with
/// [`CodecError::UnsupportedVersion`] (the design's "Versioned formats" says how versions move).
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest wire protocol version this build still reads (the previous one, once there is one).
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Header length in bytes.
pub const HEADER_BYTES: usize = 10;
/// Largest payload accepted (and the decode limit given to bincode).
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error(
        "unsupported protocol version {0}: this build reads versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION} \
         (upgrade Imago one process at a time: every process reads the previous version)"
    )]
    UnsupportedVersion(u16),
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
    #[error("cannot encode: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD_BYTES>()
}

/// Encodes a payload (no frame header).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a whole payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Encodes a value as one frame (header + payload).
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = encode(value)?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads a frame header; returns the payload length. `Ok(None)` if fewer than
/// [`HEADER_BYTES`] bytes are available.
pub fn read_header(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let magic: [u8; 4] = buf[0..4].try_into().expect("length checked");
    if magic != MAGIC {
        return Err(CodecError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([buf[4], buf[5]]);
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let len = u32::from_be_bytes(buf[6..10].try_into().expect("length checked")) as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Decodes the first frame of `buf`. `Ok(None)` means more bytes are needed; otherwise returns
/// the value and the number of bytes the frame used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, CodecError> {
    let Some(len) = read_header(buf)? else { return Ok(None) };
    if buf.len() < HEADER_BYTES + len {
        return Ok(None);
    }
    let value = decode(&buf[HEADER_BYTES..HEADER_BYTES + len])?;
    Ok(Some((value, HEADER_BYTES + len)))
}
