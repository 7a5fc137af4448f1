//! The one SHA-256 apilb shows and compares: lowercase hex.
//!
//! Config hashes, fingerprints, the settings hash and the digests that name
//! check files are all this, so they can be compared with `sha256sum`.

use sha2::{Digest, Sha256};

/// SHA-256 of `data`, as 64 lowercase hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// The value `sha256sum` prints for the same bytes.
    #[test]
    fn matches_sha256sum() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
