//! Several nodes on one PostgreSQL manifest (issue 7): sweepers sharing the work through leases,
//! one of them killed in the middle, and the audit trail proving that no file was ever copied
//! by two nodes at once. The S3 bodies run on the in-process server and, in `.ci/run`, on Garage.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::mount::{served, Daemon};
use common::pg::PgCluster;
use common::s3::S3Server;
use common::{command, pseudo_random, run_command, small_tree, wait_capturing, Hold, Run, Work};
use serde_json::Value;

/// Short, so the dead node's files are taken over within the test's time.
const LEASE: &str = "3s";

/// One `cutoverfs sweep` in the background.
struct Sweeper {
    child: Child,
    started: Instant,
}

impl Sweeper {
    fn start(work: &Work, server: &S3Server, dest: &str, manifest: &str, extra: &[&str]) -> Self {
        Self::start_held(work, server, dest, manifest, extra, None)
    }

    /// As `start`, held at `hold` when given (src/testhook.rs).
    fn start_held(
        work: &Work,
        server: &S3Server,
        dest: &str,
        manifest: &str,
        extra: &[&str],
        hold: Option<&Hold>,
    ) -> Self {
        let mut cmd = command();
        server.apply_env(&mut cmd);
        if let Some(hold) = hold {
            hold.apply(&mut cmd);
        }
        cmd.arg("sweep")
            .arg("--source")
            .arg(&work.src)
            .args(["--dest", dest, "--manifest", manifest])
            .args(["--no-progress", "--retry-delay", "10ms"])
            .args(["--lease-timeout", LEASE])
            .args(extra)
            .env("CUTOVERFS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Sweeper {
            child: cmd.spawn().expect("start cutoverfs sweep"),
            started: Instant::now(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(self) -> Run {
        wait_capturing(self.child, self.started, Duration::from_secs(150))
    }

    fn kill9(mut self) {
        self.child.kill().expect("kill -9 the sweeper");
        let _ = self.child.wait();
    }
}

/// A source of a few thousand small files and some multi-MiB ones (copies that take a while, so
/// leases are held across renewals and a kill lands in the middle of some). Returns every
/// file's relative path.
fn mixed_tree(work: &Work) -> Vec<String> {
    small_tree(work, 2500, 10, 50, 3000, 71);
    for i in 0..8u64 {
        let len = (3 << 20) + (i as usize) * 300_000;
        work.write(&format!("big/video-{i}.bin"), &pseudo_random(len, 900 + i));
    }
    files_below(&work.src)
}

fn files_below(root: &std::path::Path) -> Vec<String> {
    common::files_of(&common::snapshot(root))
        .into_keys()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn count(pg: &PgCluster, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .parse()
        .unwrap()
}

/// `count`, or 0 while the schema is not there yet (the sweepers are starting).
fn count_soon(pg: &PgCluster, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// `cutoverfs log --format json` as JSON rows, oldest first.
fn audit_rows(manifest: &str) -> Vec<Value> {
    let run = run_command(command().args(["log", "--manifest", manifest, "--format", "json"]));
    run.assert_code(0);
    run.stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// What the audit trail says about leases.
#[derive(Debug, Default)]
struct LeaseHistory {
    /// Leases taken over after they expired, by the node that had held them.
    taken_over_from: HashMap<String, usize>,
    /// Files each node recorded verified.
    verified_by: HashMap<String, usize>,
    /// Claims (into `copying`) by node.
    claims_by: HashMap<String, usize>,
}

/// Walks every path's changes in order and checks that the copying intervals of different
/// nodes never overlap: a path enters `copying` only when nobody holds it, or by taking over a
/// lease whose recorded expiry had passed; it leaves `copying` only by its current holder's
/// lease; its verified row comes from that holder. Panics with the path's history otherwise.
fn check_leases(rows: &[Value]) -> LeaseHistory {
    let mut by_path: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for row in rows {
        by_path
            .entry(row["path"].as_str().unwrap())
            .or_default()
            .push(row);
    }
    let mut history = LeaseHistory::default();
    for (path, changes) in by_path {
        let story = || {
            changes
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut holder: Option<String> = None;
        for row in &changes {
            let (from, to) = (row["from"].as_str(), row["to"].as_str().unwrap());
            let lease = row["lease"].as_str().map(str::to_string);
            let at = row["at"].as_i64().unwrap();
            let node = row["node"].as_str().unwrap().to_string();
            if to == "copying" {
                let claimer = lease.clone().expect("a claim names its lease holder");
                *history.claims_by.entry(claimer.clone()).or_default() += 1;
                match (&holder, from) {
                    (Some(old), Some("copying")) => {
                        let why = row["why"].as_str().unwrap_or_default();
                        let expiry = why
                            .strip_prefix(&format!("lease of {old} expired at "))
                            .unwrap_or_else(|| {
                                panic!("{path}: {claimer} took the file from {old} without an expired lease:\n{}", story())
                            });
                        let expiry_ms = humantime::parse_rfc3339(expiry)
                            .unwrap_or_else(|e| panic!("{path}: bad expiry {expiry:?}: {e}"))
                            .duration_since(UNIX_EPOCH)
                            .unwrap()
                            .as_millis() as i64;
                        assert!(
                            expiry_ms <= at,
                            "{path}: {claimer} took the file at {at} from {old}, whose lease ran \
                             until {expiry_ms}: copied by two nodes at once\n{}",
                            story()
                        );
                        *history.taken_over_from.entry(old.clone()).or_default() += 1;
                    }
                    (None, _) => {}
                    (Some(old), _) => panic!(
                        "{path}: claimed by {claimer} while {old} held it\n{}",
                        story()
                    ),
                }
                holder = Some(claimer);
            } else if from == Some("copying") {
                assert_eq!(
                    lease,
                    holder,
                    "{path}: left copying under another lease than its holder's\n{}",
                    story()
                );
                if to == "verified" {
                    assert_eq!(
                        Some(&node),
                        holder.as_ref(),
                        "{path}: recorded verified by a node that did not hold it\n{}",
                        story()
                    );
                    *history.verified_by.entry(node).or_default() += 1;
                }
                holder = None;
            }
        }
        assert_eq!(
            holder,
            None,
            "{path}: still copying at the end\n{}",
            story()
        );
    }
    history
}

/// The lease holder ids in the trail of the sweeper with this pid (`host:pid:start_ms`).
fn node_of(pid: u32, history: &LeaseHistory) -> String {
    let marker = format!(":{pid}:");
    history
        .claims_by
        .keys()
        .find(|node| node.contains(&marker))
        .unwrap_or_else(|| panic!("no claim by pid {pid} in {:?}", history.claims_by))
        .clone()
}

s3_tests! {
    /// Three sweepers, one manifest, one bucket; one is killed -9 mid-way with leases in hand.
    /// The two others take its files over once its leases expire; in the end every file is
    /// verified and byte-identical at the dest, and the trail shows no overlapping copies.
    fn three_sweepers_one_killed(server: &S3Server) {
        let pg = PgCluster::shared();
        let manifest = pg.create_database();
        let db = db_name(&manifest).to_string();
        let work = Work::new();
        let files = mixed_tree(&work);
        let dest = server.dest_url("nodes");
        let extra = ["--batch-size", "40", "--concurrency", "8"];
        // The one to be killed is held in its first copy, so it has a lease in hand when it is
        // killed, however fast the others are (src/testhook.rs).
        let hold = Hold::at("copy:read");
        let sweepers: Vec<Sweeper> = (0..3)
            .map(|i| {
                let hold = (i == 0).then_some(&hold);
                Sweeper::start_held(&work, server, &dest, &manifest, &extra, hold)
            })
            .collect();
        let mut sweepers = sweepers.into_iter();
        let victim = sweepers.next().unwrap();
        let victim_pid = victim.pid();
        let victim_leases = format!(
            "SELECT count(*) FROM entries WHERE state = 'copying' AND lease_owner LIKE '%:{victim_pid}:%'"
        );
        // Mid-way: a good part verified, and the victim holding a lease on the copy held.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(Instant::now() < deadline, "the sweep made no progress");
            let verified = count_soon(pg, &db, "SELECT count(*) FROM entries WHERE state = 'verified'");
            if verified as usize >= files.len() / 4 && hold.is_reached() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        victim.kill9();
        let orphaned = count(pg, &db, &victim_leases);
        assert!(orphaned > 0, "the killed sweeper held no lease: the test did not test");
        let survivors: Vec<Sweeper> = sweepers.collect();
        let survivor_pids: Vec<u32> = survivors.iter().map(Sweeper::pid).collect();
        for run in survivors.into_iter().map(Sweeper::wait) {
            run.assert_code(0);
            assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}");
        }

        assert_eq!(
            count(pg, &db, "SELECT count(*) FROM entries WHERE kind = 'file' AND state = 'verified'"),
            files.len() as u64
        );
        assert_eq!(count(pg, &db, "SELECT count(*) FROM entries WHERE kind = 'file' AND state <> 'verified'"), 0);
        for rel in &files {
            let want = std::fs::read(work.src.join(rel)).unwrap();
            let got = server
                .get(&format!("nodes/{rel}"))
                .unwrap_or_else(|| panic!("{rel} is not at the dest"));
            assert!(got == want, "{rel} differs at the dest");
        }
        assert_eq!(server.list("nodes/").len(), files.len(), "stray objects at the dest");
        replica_reads_every_file(&work, server, &dest, &manifest, &files);

        let history = check_leases(&audit_rows(&manifest));
        let victim_node = node_of(victim_pid, &history);
        assert!(
            history.taken_over_from.get(&victim_node).copied().unwrap_or(0) as u64 >= orphaned,
            "the killed node's {orphaned} leases were not all taken over: {history:?}"
        );
        for pid in survivor_pids {
            let node = node_of(pid, &history);
            assert!(
                history.verified_by.get(&node).copied().unwrap_or(0) > 0,
                "{node} copied nothing: the work was not shared ({history:?})"
            );
        }
    }
}

/// A replica mount (`--no-source`: the manifest's tree, the dest's data) on "another machine"
/// reads every file byte-identical to the source. It is given the dest as the other nodes are
/// (the manifest records no region, which Garage checks).
fn replica_reads_every_file(
    work: &Work,
    server: &S3Server,
    dest: &str,
    manifest: &str,
    files: &[String],
) {
    let mnt = work.root.join("replica");
    std::fs::create_dir(&mnt).unwrap();
    let args: Vec<std::ffi::OsString> = ["--no-source", "--dest", dest, "--manifest", manifest]
        .iter()
        .map(Into::into)
        .collect();
    let daemon = Daemon::start_with_env(&mnt, &args, &server.env());
    for rel in files {
        let want = std::fs::read(work.src.join(rel)).unwrap();
        let got = std::fs::read(mnt.join(rel))
            .unwrap_or_else(|e| panic!("{rel} through the replica: {e}\n{}", daemon.log_text()));
        assert!(got == want, "{rel} differs through the replica");
    }
    let log = daemon.stop();
    assert!(served(&log, "opens_dest") >= files.len() as u64, "{log}");
}

/// A claim whose reply was lost (the connection died as PostgreSQL committed it) leaves a lease
/// the run does not know of. It must run out and the file be copied, not be renewed for as long
/// as the run lives and the file left pending at its end.
#[test]
fn a_lease_the_run_does_not_know_of_runs_out_and_its_file_is_copied() {
    let server = S3Server::in_process();
    let pg = PgCluster::shared();
    let manifest = pg.create_database();
    let db = db_name(&manifest).to_string();
    let work = Work::new();
    small_tree(&work, 400, 4, 2000, 4000, 5);
    let files = files_below(&work.src);
    let dest = server.dest_url("orphan");
    // Slow enough (about 4 s) that the run is still copying when the lease is planted.
    let extra = [
        "--bwlimit",
        "300KiB",
        "--batch-size",
        "20",
        "--concurrency",
        "2",
    ];
    let sweeper = Sweeper::start(&work, &server, &dest, &manifest, &extra);
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        assert!(Instant::now() < deadline, "the sweep never held a lease");
        let held = pg
            .psql(
                &db,
                "SELECT lease_owner FROM entries WHERE state = 'copying' LIMIT 1",
            )
            .unwrap_or_default();
        if !held.is_empty() {
            break held;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The last file in claim order, not reached yet, leased to the run as a lost claim leaves it.
    let planted = pg
        .psql(
            &db,
            &format!(
                "UPDATE entries SET state = 'copying', lease_owner = '{node}', \
                 lease_expires_at = (extract(epoch FROM now()) * 1000)::bigint + 3000 \
                 WHERE path = (SELECT max(path) FROM entries WHERE state = 'pending' AND kind = 'file') \
                 RETURNING path"
            ),
        )
        .unwrap();
    assert!(
        !planted.is_empty(),
        "the sweep was over before the lease was planted"
    );
    let run = sweeper.wait();
    run.assert_code(0);
    assert_eq!(
        count(
            pg,
            &db,
            "SELECT count(*) FROM entries WHERE kind = 'file' AND state <> 'verified'"
        ),
        0,
        "{planted} left behind\n{run}"
    );
    assert_eq!(
        server.get(&format!("orphan/{planted}")),
        Some(std::fs::read(work.src.join(&planted)).unwrap())
    );
    assert_eq!(server.list("orphan/").len(), files.len());
}

/// `cutoverfs log --format json` rows checked by `check_leases` catch a claim of a live lease.
#[test]
fn the_lease_check_catches_a_claim_of_a_live_lease() {
    let row = |id: i64, at: i64, from: Option<&str>, to: &str, lease: &str, why: &str| {
        serde_json::json!({"id": id, "at": at, "path": "a", "node": lease, "command": "sweep",
            "from": from, "to": to, "lease": lease, "why": why})
    };
    let expiry_ms = 1_800_000_000_500;
    let expiry =
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(expiry_ms as u64));
    let takeover = |at| {
        vec![
            row(
                1,
                1_800_000_000_000,
                Some("pending"),
                "copying",
                "A",
                "attempt 1",
            ),
            row(
                2,
                at,
                Some("copying"),
                "copying",
                "B",
                &format!("lease of A expired at {expiry}"),
            ),
            row(3, at + 10, Some("copying"), "verified", "B", "copied"),
        ]
    };
    let history = check_leases(&takeover(expiry_ms + 1));
    assert_eq!(history.taken_over_from.get("A"), Some(&1));
    let early = std::panic::catch_unwind(|| check_leases(&takeover(expiry_ms - 1)));
    assert!(
        early.is_err(),
        "a takeover before the expiry passed the check"
    );
}

/// A cluster of this test's own (stopped and started again mid-test) and a fresh database on
/// it; commits are durable there, as in production, so an immediate stop loses none.
fn own_cluster() -> (PgCluster, String) {
    let pg = PgCluster::start_durable();
    let url = pg.create_database();
    (pg, url)
}

/// How many lines of `log` contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// PostgreSQL stops (immediate shutdown: connections cut, nothing flushed cleanly) in the middle
/// of a sweep and comes back, once the sweep has found it gone, on the same port and data: the
/// sweep pauses, says so once, resumes, and ends with every file verified and identical at the
/// dest.
#[test]
fn a_sweep_pauses_while_postgresql_is_down_and_finishes_after() {
    let (pg, manifest) = own_cluster();
    let db = db_name(&manifest).to_string();
    let mut work = Work::new();
    work.pg_url = Some(manifest.clone());
    small_tree(&work, 1200, 6, 50, 2000, 5);
    for i in 0..4u64 {
        work.write(
            &format!("big/scan-{i}.bin"),
            &pseudo_random(3 << 20, 40 + i),
        );
    }
    let files = files_below(&work.src);
    // The sweep's log goes to a file, read while it runs: the outage lasts until the sweep has
    // said it lost the manifest (copies of big files can keep it away from the manifest for a
    // few seconds, so a fixed outage may pass unnoticed).
    let stderr_file = work.root.join("sweep.stderr");
    let mut cmd = command();
    cmd.arg("sweep")
        .args(work.target())
        // Slow enough that the outage lands mid-way: about 14 MiB at 2 MiB/s.
        .args(["--no-progress", "--concurrency", "4", "--batch-size", "25"])
        .args(["--bwlimit", "2MiB"])
        .env("CUTOVERFS_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&stderr_file).unwrap());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start cutoverfs sweep");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_soon(
        &pg,
        &db,
        "SELECT count(*) FROM entries WHERE state = 'verified'",
    ) < 200
    {
        assert!(Instant::now() < deadline, "the sweep made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before the outage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pg.stop_server_immediately();
    let host = format!("manifest unreachable at 127.0.0.1:{}", pg.port);
    // Bound: a copy of the sweep reaches the manifest within one batch (at most ~14 MiB at
    // 2 MiB/s); a sweep that never notices the outage fails here.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !fs::read_to_string(&stderr_file)
        .unwrap_or_default()
        .contains(&host)
    {
        assert!(
            Instant::now() < deadline,
            "the sweep did not notice that PostgreSQL was down:\n{}",
            fs::read_to_string(&stderr_file).unwrap_or_default()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep stopped while PostgreSQL was down:\n{}",
            fs::read_to_string(&stderr_file).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sweep stopped while PostgreSQL was down"
    );
    pg.start_server();
    let mut run = wait_capturing(child, started, Duration::from_secs(150));
    run.stderr = fs::read_to_string(&stderr_file).unwrap();
    run.assert_code(0);
    assert!(run.stdout.contains("MIGRATION COMPLETE"), "{run}");
    assert_eq!(
        lines_with(&run.stderr, &host),
        1,
        "one clear error line\n{run}"
    );
    assert!(
        lines_with(&run.stderr, "copies paused, retrying") == 1,
        "{run}"
    );
    assert!(run.stderr.contains("manifest reachable again"), "{run}");
    assert!(!run.stderr.contains(common::pg::PASSWORD), "{run}");
    assert_eq!(
        count(
            &pg,
            &db,
            "SELECT count(*) FROM entries WHERE kind = 'file' AND state = 'verified'"
        ),
        files.len() as u64
    );
    common::assert_trees_equal(&work.src, &work.dest);
    // Nothing recorded verified without its object: a deep verify re-reads every one.
    let verify = work.cmd_manifest_only("verify", &["--deep"]);
    verify.assert_code(0);
}

/// A mount whose manifest goes away keeps serving the files it has locally, byte for byte and
/// without waiting on the database for each; its sweeper pauses and copies again once
/// PostgreSQL is back.
#[test]
fn a_mount_serves_local_files_while_postgresql_is_down() {
    use common::mount::{wait_until, Daemon};
    let (pg, manifest) = own_cluster();
    let db = db_name(&manifest).to_string();
    let mut work = Work::new();
    work.pg_url = Some(manifest.clone());
    let mut expected = BTreeMap::new();
    for i in 0..40u64 {
        let rel = format!("d{}/file-{i}.bin", i % 4);
        let content = pseudo_random(1000 + (i as usize) * 3000, 300 + i);
        work.write(&rel, &content);
        expected.insert(rel, content);
    }
    let args: Vec<std::ffi::OsString> = ["--dest", &work.dest_url(), "--manifest", &manifest]
        .iter()
        .map(Into::into)
        .collect();
    let daemon = Daemon::start(&work.src, &args);
    daemon.wait_for_scan();
    let verified = "SELECT count(*) FROM entries WHERE kind = 'file' AND state = 'verified'";
    wait_until(Duration::from_secs(60), "every file verified", || {
        count_soon(&pg, &db, verified) == expected.len() as u64
    });

    pg.stop_server_immediately();
    let reading = Instant::now();
    for (rel, content) in &expected {
        let got = std::fs::read(work.src.join(rel)).unwrap_or_else(|e| {
            panic!(
                "{rel} unreadable with PostgreSQL down: {e}\n{}",
                daemon.log_text()
            )
        });
        assert!(got == *content, "{rel} differs with PostgreSQL down");
    }
    let listed = std::fs::read_dir(work.src.join("d1")).unwrap().count();
    assert_eq!(
        listed, 10,
        "a listing with PostgreSQL down shows the local files"
    );
    // The first query waits for a connection (5 s) and marks the manifest down; the other
    // reads do not wait.
    assert!(
        reading.elapsed() < Duration::from_secs(15),
        "reads waited on the database: {:?}",
        reading.elapsed()
    );
    let host = format!("manifest unreachable at 127.0.0.1:{}", pg.port);
    wait_until(Duration::from_secs(20), "the outage logged", || {
        lines_with(&daemon.log_text(), &host) == 1
    });

    pg.start_server();
    wait_until(Duration::from_secs(30), "the manifest seen back", || {
        daemon.log_text().contains("manifest reachable again")
    });
    std::fs::write(
        work.src.join("d0/after.bin"),
        b"written once PostgreSQL was back",
    )
    .unwrap();
    wait_until(Duration::from_secs(60), "the new file copied", || {
        count_soon(&pg, &db, verified) == expected.len() as u64 + 1
    });
    let log = daemon.stop();
    assert_eq!(lines_with(&log, &host), 1, "one clear error line\n{log}");
    assert_eq!(
        std::fs::read(work.dest.join("d0/after.bin")).unwrap(),
        b"written once PostgreSQL was back"
    );
}
