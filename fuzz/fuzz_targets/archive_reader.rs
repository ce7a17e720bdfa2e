//! Feeds arbitrary bytes to the archive reader restore uses: gzip (parallel or plain), tar,
//! entry checks, manifest parsing and the db digest. It must refuse or accept, never panic,
//! never write anything but its one destination file, and never claim a db larger than the
//! limit.
#![no_main]

use etcd_actions::archive::{unpack, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("in.tar.gz");
    std::fs::write(&archive, data).expect("write input");
    let dest = dir.path().join("db");
    let limits = Limits { max_db: 1 << 20 };
    let file = std::fs::File::open(&archive).expect("open input");
    let size = Some(data.len() as u64);
    // No identity: an age header is refused as encrypted, never opened.
    let keys = etcd_actions::crypt::Keys::default();
    match unpack(file, size, &archive, &dest, None, limits, &keys) {
        Ok(u) => {
            assert!(u.db.size <= limits.max_db);
            assert_eq!(std::fs::metadata(&dest).expect("db written").len(), u.db.size);
        }
        Err(_) => assert!(!dest.exists(), "a refused archive leaves no db behind"),
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(names.len() <= 2, "wrote outside its destination: {names:?}");
});
