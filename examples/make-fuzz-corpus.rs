//! Writes seed archives for the archive-reader fuzzer into the directory given: one of ours
//! (parallel gzip, `./db` with etcd's trailer, manifest), one in the original charm's layout
//! (plain gzip, raw db), and a symlink entry.

use std::io::Write;
use std::path::PathBuf;

use etcd_actions::archive::pack;
use etcd_actions::manifest::{Manifest, SOURCE_SNAPSHOT};
use sha2::{Digest, Sha256};

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: make-fuzz-corpus DIR"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(".db");
    let mut db: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let raw = db.clone();
    let digest: [u8; 32] = Sha256::digest(&db).into();
    db.extend_from_slice(&digest);
    std::fs::write(&tmp, &db).unwrap();
    let mut manifest = Manifest::new("etcd/0", SOURCE_SNAPSHOT);
    manifest.etcd_version = Some("3.5.1".into());
    manifest.revision = Some(1);
    manifest.keys = Some(0);
    let out = std::fs::File::create(dir.join("ours.tar.gz")).unwrap();
    pack(&tmp, manifest, true, out, 1, None).unwrap();
    std::fs::remove_file(&tmp).unwrap();

    let legacy = |name: &str, entry: &str, kind: tar::EntryType, data: &[u8]| {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.as_gnu_mut().unwrap().name[..entry.len()].copy_from_slice(entry.as_bytes());
        h.set_cksum();
        tar.append(&h, data).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar.into_inner().unwrap()).unwrap();
        std::fs::write(dir.join(name), gz.finish().unwrap()).unwrap();
    };
    legacy("legacy.tar.gz", "./db", tar::EntryType::Regular, &raw);
    legacy("symlink.tar.gz", "./db", tar::EntryType::Symlink, b"");
}
