//! Property test of the engine through its library API: random sequences of changes to the
//! source (write, rewrite, delete, chmod) interleaved with sweeps. After every sweep, each
//! source file is verified and identical at the dest (content and mode), each deleted file is
//! `missing`, and nothing but our files is at the dest. Failures shrink to a minimal sequence.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cutoverfs::engine::scan::scan_into_manifest;
use cutoverfs::engine::sweep::{run_sweep, SweepOptions};
use cutoverfs::engine::{Limits, LiveLimits, PathFilter, Progress};
use cutoverfs::manifest::{Manifest, ManifestUrl, Pair, State};
use cutoverfs::source::SourceTree;
use cutoverfs::store::{open_store, DestUrl};
use proptest::prelude::*;

const PATHS: [&str; 6] = [
    "a.jpg",
    "b.pdf",
    "docs/c.pdf",
    "docs/d.txt",
    "docs/deep/e.bin",
    "f",
];

#[derive(Debug, Clone)]
enum Op {
    Write { file: usize, len: usize, seed: u8 },
    Delete { file: usize },
    Chmod { file: usize, mode: u32 },
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Few sizes, so that rewrites often keep the size and only the content and mtime change.
        4 => (0..PATHS.len(), prop::sample::select(vec![0usize, 10, 4096, 70_001]), any::<u8>())
            .prop_map(|(file, len, seed)| Op::Write { file, len, seed }),
        1 => (0..PATHS.len()).prop_map(|file| Op::Delete { file }),
        1 => (0..PATHS.len(), prop::sample::select(vec![0o600u32, 0o640, 0o644, 0o755])).prop_map(|(file, mode)| Op::Chmod { file, mode }),
        2 => Just(Op::Sweep),
    ]
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn apply(root: &Path, op: &Op) {
    match op {
        Op::Write { file, len, seed } => {
            let path = root.join(PATHS[*file]);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content(*len, *seed)).unwrap();
        }
        Op::Delete { file } => {
            let _ = std::fs::remove_file(root.join(PATHS[*file]));
        }
        Op::Chmod { file, mode } => {
            let path = root.join(PATHS[*file]);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
        }
        Op::Sweep => {}
    }
}

async fn sweep(manifest: &Manifest, source_dir: &Path, dest_dir: &Path) {
    let source = Arc::new(SourceTree::open(source_dir).unwrap());
    let store = open_store(&DestUrl::Local(dest_dir.to_path_buf()), &Default::default())
        .await
        .unwrap();
    store.prepare().await.unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    scan_into_manifest(manifest, source.clone(), store.clone(), &stop)
        .await
        .unwrap();
    manifest.requeue_for_new_sweep().await.unwrap();
    let opts = SweepOptions {
        limits: LiveLimits::new(Limits {
            concurrency: 4,
            bwlimit: None,
            max_ops: None,
            filter: PathFilter::default(),
        }),
        batch_size: 3,
        max_retries: 0,
        retry_delay: Duration::from_millis(1),
        lease: Duration::from_secs(30),
        node: "proptest".into(),
        dest_timeout: Duration::from_secs(60),
        keep_running: None,
        on_verified: None,
        command: "sweep".into(),
        requests_only: false,
        stop_grace: Duration::from_secs(30),
    };
    let progress = Progress::start("test", true, Duration::ZERO);
    run_sweep(manifest, source, store, &opts, progress, &stop)
        .await
        .unwrap();
}

async fn check(manifest: &Manifest, source: &Path, dest: &Path) -> Result<(), TestCaseError> {
    let files = manifest.files().await.unwrap();
    for rel in PATHS {
        let row = files.iter().find(|f| f.path == rel);
        let src = source.join(rel);
        match std::fs::read(&src) {
            Ok(bytes) => {
                prop_assert_eq!(
                    row.map(|r| r.state),
                    Some(State::Verified),
                    "{} should be verified",
                    rel
                );
                let copy = std::fs::read(dest.join(rel)).unwrap_or_default();
                prop_assert!(copy == bytes, "{} differs at the dest", rel);
                let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
                prop_assert_eq!(mode(&src), mode(&dest.join(rel)), "mode of {}", rel);
            }
            Err(_) => {
                if let Some(row) = row {
                    prop_assert_eq!(row.state, State::Missing, "{} was deleted", rel);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_sweep_leaves_every_file_verified_and_identical(ops in prop::collection::vec(op(), 1..14)) {
        let work = tempfile::tempdir().unwrap();
        let (source, dest) = (work.path().join("src"), work.path().join("dest"));
        std::fs::create_dir_all(&source).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let url = ManifestUrl::Sqlite(work.path().join("m.db"));
            let manifest = Manifest::open(&url).await.unwrap();
            let pair = Pair { source: source.display().to_string(), dest: format!("file://{}", dest.display()) };
            manifest.check_pair(&pair, true).await.unwrap();
            for op in ops.iter().chain([&Op::Sweep]) {
                apply(&source, op);
                if matches!(op, Op::Sweep) {
                    sweep(&manifest, &source, &dest).await;
                    check(&manifest, &source, &dest).await?;
                }
            }
            manifest.close().await;
            Ok::<(), TestCaseError>(())
        })?;
    }
}
