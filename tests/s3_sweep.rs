//! `sweep`, `plan` and `status` with an s3:// dest, against real S3 servers over HTTP: each test
//! body runs on the in-process server (s3s-fs) and, in `.ci/run`, on Garage.

mod common;

use std::ffi::OsString;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::s3::{CorruptingProxy, Kind, S3Server};
use common::{command, run_command, sha256_hex, Run, Work};

/// A workspace whose dest is a prefix on `server`.
struct S3Work<'s> {
    work: Work,
    server: &'s S3Server,
    prefix: String,
}

impl<'s> S3Work<'s> {
    fn new(server: &'s S3Server, prefix: &str) -> S3Work<'s> {
        S3Work {
            work: Work::new(),
            server,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    fn dest(&self) -> String {
        self.server.dest_url(&self.prefix)
    }

    /// The dest URL reached through another endpoint (a proxy in front of the server).
    fn dest_through(&self, endpoint: &str) -> String {
        self.dest().replace(&self.server.endpoint(), endpoint)
    }

    fn args(&self, cmd: &str, dest: &str, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            cmd.into(),
            "--source".into(),
            self.work.src.clone().into(),
            "--dest".into(),
            dest.into(),
            "--manifest".into(),
            self.work.manifest_url().into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        args
    }

    fn run_with_dest(&self, cmd: &str, dest: &str, extra: &[&str]) -> Run {
        let mut command = command();
        self.server.apply_env(&mut command);
        command.args(self.args(cmd, dest, extra));
        run_command(&mut command)
    }

    fn run(&self, cmd: &str, extra: &[&str]) -> Run {
        self.run_with_dest(cmd, &self.dest(), extra)
    }

    fn sweep(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--no-progress", "--retry-delay", "10ms"];
        args.extend_from_slice(extra);
        self.run("sweep", &args)
    }

    /// Starts a sweep in the background and returns once `objects` files are at the dest.
    fn start_sweep_until_uploaded(
        &self,
        flags: &[&str],
        objects: usize,
    ) -> (std::process::Child, Instant) {
        let mut cmd = command();
        self.server.apply_env(&mut cmd);
        cmd.args(self.args("sweep", &self.dest(), flags))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd.spawn().expect("start sweep");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.server.list(&format!("{}/", self.prefix)).len() < objects {
            assert!(Instant::now() < deadline, "the sweep does not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (child, started)
    }

    fn status(&self) -> serde_json::Value {
        self.work.status()
    }

    /// Every file of the source is at its key, byte for byte, and nothing else is under the
    /// prefix.
    fn assert_dest_matches_source(&self) {
        let files = source_files(&self.work);
        // A probe of a preflight killed at the wrong moment stays until a later preflight
        // finds it old; it is never a file's key.
        let listed: Vec<_> = self
            .server
            .list(&format!("{}/", self.prefix))
            .into_iter()
            .filter(|(key, _)| !key.contains("/.cutoverfs-probe-"))
            .collect();
        assert_eq!(
            listed.len(),
            files.len(),
            "objects under the prefix: {listed:?}"
        );
        for (rel, content) in files {
            let object = self
                .server
                .get(&self.key(&rel))
                .unwrap_or_else(|| panic!("no object for {rel}"));
            assert!(object == content, "{rel}: object differs from the source");
        }
    }
}

/// The source's files by relative path.
fn source_files(work: &Work) -> Vec<(String, Vec<u8>)> {
    common::dir_contents(&work.src)
        .into_iter()
        .map(|(path, content)| {
            let rel = path.strip_prefix(&work.src).unwrap();
            (rel.to_str().unwrap().to_string(), content)
        })
        .collect()
}

fn count(status: &serde_json::Value, state: &str) -> u64 {
    common::state_count(status, "files", state)
}

s3_tests! {
    fn sweep_puts_every_file_with_its_hash_and_metadata(server: &S3Server) {
        let w = S3Work::new(server, "site/media");
        w.work.write("avatars/a.jpg", b"jpeg bytes");
        w.work.write("docs/report 2024 \u{e9}t\u{e9}.pdf", &common::pseudo_random(70_000, 1));
        w.work.write("empty.txt", b"");
        common::small_tree(&w.work, 40, 3, 1, 5000, 7);
        common::set_mode(&w.work.src.join("avatars/a.jpg"), 0o640);
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_eq!(run.count("Successfully copied"), 43, "{run}");
        w.assert_dest_matches_source();

        let meta = server.head_metadata(&w.key("avatars/a.jpg")).expect("object");
        assert_eq!(meta.get("cutoverfs-sha256").map(String::as_str), Some(sha256_hex(b"jpeg bytes").as_str()));
        assert_eq!(meta.get("mode").map(String::as_str), Some("640"));
        assert!(meta.get("mtime").is_some_and(|m| m.contains('.')), "{meta:?}");
        assert!(meta.contains_key("cutoverfs-writer"), "{meta:?}");
        assert_eq!(meta.get("content-type").map(String::as_str), Some("image/jpeg"));
        assert_eq!(meta.get("cache-control").map(String::as_str), Some("max-age=86400"));

        let status = w.status();
        assert_eq!(count(&status, "verified"), 43, "{status}");
        // A second run finds nothing to do.
        let again = w.sweep(&[]);
        again.assert_code(0);
        assert_eq!(again.count("Successfully copied"), 0, "{again}");
    }

    fn large_files_go_up_in_parts_and_arrive_whole(server: &S3Server) {
        let w = S3Work::new(server, "big");
        let content = common::pseudo_random(23 * 1024 * 1024 + 12_345, 3);
        w.work.write("video/clip.mp4", &content);
        w.work.write("small.txt", b"small");
        let run = w.sweep(&[
            "--s3-multipart-threshold", "6MiB",
            "--s3-part-size", "5MiB",
            "--s3-upload-memory", "12MiB",
        ]);
        run.assert_code(0);
        w.assert_dest_matches_source();
        let meta = server.head_metadata(&w.key("video/clip.mp4")).expect("object");
        assert_eq!(meta.get("cutoverfs-sha256"), Some(&sha256_hex(&content)));
        assert_eq!(meta.get("content-type").map(String::as_str), Some("video/mp4"));
        assert!(server.multipart_uploads().is_empty(), "no upload left open");
        let status = w.status();
        assert_eq!(count(&status, "verified"), 2, "{status}");
    }

    fn objects_cutoverfs_did_not_write_are_never_replaced(server: &S3Server) {
        let w = S3Work::new(server, "conflicts");
        w.work.write("same.txt", b"identical content");
        w.work.write("other.txt", b"our version");
        w.work.write("longer.txt", b"our version, longer");
        server.put(&w.key("same.txt"), b"identical content");
        server.put(&w.key("other.txt"), b"their versio");
        server.put(&w.key("longer.txt"), b"theirs");
        let run = w.sweep(&[]);
        run.assert_code(1);
        assert_eq!(run.count("Conflicts"), 2, "{run}");
        assert_eq!(run.count("Already exist"), 1, "{run}");
        assert_eq!(server.get(&w.key("other.txt")).unwrap(), b"their versio");
        assert_eq!(server.get(&w.key("longer.txt")).unwrap(), b"theirs");
        let status = w.status();
        assert_eq!(count(&status, "conflict"), 2, "{status}");
        assert_eq!(count(&status, "verified"), 1, "{status}");
        // A re-run leaves them alone too.
        w.sweep(&[]).assert_code(1);
        assert_eq!(server.get(&w.key("other.txt")).unwrap(), b"their versio");
    }

    fn a_changed_file_replaces_the_object_cutoverfs_wrote(server: &S3Server) {
        let w = S3Work::new(server, "changes");
        let path = w.work.write("doc.txt", b"first version");
        w.sweep(&[]).assert_code(0);
        std::thread::sleep(Duration::from_millis(20));
        common::write_file(&path, b"second, longer version");
        let run = w.sweep(&[]);
        run.assert_code(0);
        assert_eq!(run.count("Successfully copied"), 1, "{run}");
        assert_eq!(server.get(&w.key("doc.txt")).unwrap(), b"second, longer version");
    }

    fn corrupted_uploads_are_never_verified(server: &S3Server) {
        let w = S3Work::new(server, "corrupt");
        let marker = b"CUTOVERFS-CORRUPT-ME-";
        let poisoned: Vec<u8> = marker.iter().copied().cycle().take(64 * 1024).collect();
        w.work.write("poisoned.bin", &poisoned);
        w.work.write("clean.txt", b"clean");
        // Every pass of the marker through the proxy flips a byte: the upload can never succeed.
        let proxy = CorruptingProxy::start(&server.endpoint(), marker, usize::MAX);
        let dest = w.dest_through(&proxy.endpoint());
        let run = w.run_with_dest(
            "sweep",
            &dest,
            &["--no-progress", "--retry-delay", "10ms", "--max-retries", "1"],
        );
        run.assert_code(1);
        assert!(proxy.corrupted() > 0, "the proxy saw the upload");
        let status = w.status();
        assert_eq!(count(&status, "verified"), 1, "{status}");
        let problem = common::problem(&status, "poisoned.bin").expect("listed as a problem");
        if server.kind() == Kind::Garage {
            assert_eq!(count(&status, "failed"), 1, "{status}");
            // Garage names the bad digest and stores nothing. s3s-fs 0.14 answers BadDigest but
            // keeps the body without our metadata, so the next attempt finds someone else's
            // object there: a conflict. Never verified either way.
            assert!(problem.to_string().contains("checksum mismatch"), "{problem}");
            assert!(server.get(&w.key("poisoned.bin")).is_none());
        }

        // Corrupted once only: the retry goes through and the object is right.
        let w2 = S3Work::new(server, "corrupt-once");
        w2.work.write("poisoned.bin", &poisoned);
        let once = CorruptingProxy::start(&server.endpoint(), marker, 1);
        let dest = w2.dest_through(&once.endpoint());
        let run = w2.run_with_dest("sweep", &dest, &["--no-progress", "--retry-delay", "10ms"]);
        assert_eq!(once.corrupted(), 1);
        if server.kind() == Kind::Garage {
            run.assert_code(0);
            assert_eq!(server.get(&w2.key("poisoned.bin")).unwrap(), poisoned);
        } else {
            // The body s3s-fs kept is not ours to replace: left alone, never verified.
            run.assert_code(1);
            assert_eq!(count(&w2.status(), "conflict"), 1);
        }
    }

    fn the_sweep_waits_out_a_server_that_goes_down(server: &S3Server) {
        let w = S3Work::new(server, "outage");
        common::small_tree(&w.work, 1500, 4, 100, 1000, 11);
        // Down once some files are up, back three seconds later.
        let (child, started) = w.start_sweep_until_uploaded(
            &["--no-progress", "--concurrency", "1", "--batch-size", "50", "--retry-delay", "100ms", "--max-retries", "0"],
            100,
        );
        server.stop();
        std::thread::sleep(Duration::from_secs(3));
        server.start_again();
        let run = common::wait_capturing(child, started, common::COMMAND_TIMEOUT);
        run.assert_code(0);
        assert!(run.stderr.contains("dest unavailable"), "the outage was seen: {run}");
        assert!(run.stderr.contains("dest is back"), "{run}");
        let status = w.status();
        assert_eq!(count(&status, "verified"), 1500, "{status}");
        assert_eq!(count(&status, "failed"), 0, "{status}");
        w.assert_dest_matches_source();
    }

    fn a_dest_down_for_too_long_stops_the_sweep_and_a_rerun_finishes(server: &S3Server) {
        let w = S3Work::new(server, "gone");
        common::small_tree(&w.work, 600, 2, 10, 100, 5);
        let (child, started) = w.start_sweep_until_uploaded(
            &["--no-progress", "--concurrency", "1", "--batch-size", "20", "--dest-timeout", "2s"],
            20,
        );
        server.stop();
        let run = common::wait_capturing(child, started, common::COMMAND_TIMEOUT);
        run.assert_code(1);
        assert!(run.stdout.contains("MIGRATION STOPPED"), "{run}");
        assert!(run.stderr.contains("has been unavailable for"), "{run}");
        let status = w.status();
        assert!(count(&status, "verified") >= 20, "{status}");
        assert_eq!(count(&status, "copying"), 0, "leases given back: {status}");
        server.start_again();
        w.sweep(&[]).assert_code(0);
        assert_eq!(count(&w.status(), "verified"), 600);
        w.assert_dest_matches_source();
    }

    fn preflight_names_each_problem_and_writes_nothing(server: &S3Server) {
        let w = S3Work::new(server, "preflight");
        w.work.write("a.txt", b"a");
        let expect_refusal = |dest: &str, env: &[(&str, &str)], says: &str| {
            let mut cmd = command();
            server.apply_env(&mut cmd);
            for (k, v) in env {
                if v.is_empty() {
                    cmd.env_remove(k);
                } else {
                    cmd.env(k, v);
                }
            }
            cmd.args(w.args("sweep", dest, &["--no-progress"]));
            let run = run_command(&mut cmd);
            run.assert_code(2);
            assert!(run.stderr.contains(says), "expected {says:?}: {run}");
            assert!(!w.work.manifest.exists(), "no manifest created: {run}");
        };
        let closed_port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let on = |endpoint: &str, bucket: &str| {
            format!("s3://{bucket}/preflight?endpoint={endpoint}&region={}&path_style=true", server.region())
        };
        expect_refusal(&on(&format!("http://127.0.0.1:{closed_port}"), "media"), &[], "endpoint unreachable");
        expect_refusal(&on(&server.endpoint().replace("http://", "https://"), "media"), &[], "TLS");
        expect_refusal(&on(&server.endpoint(), "no-such-bucket"), &[], "no such bucket");
        expect_refusal(&w.dest(), &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdef")], "access denied");
        expect_refusal(&w.dest(), &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")], "no credentials");
        expect_refusal(&format!("{}&colour=blue", w.dest()), &[], "unknown option");
        // A clock a month behind: libfaketime (Debian's faketime, installed by .ci/run).
        let mut cmd = std::process::Command::new("faketime");
        server.apply_env(&mut cmd);
        cmd.env_remove("CUTOVERFS_LOG").env_remove("CUTOVERFS_MANIFEST").stdin(Stdio::null());
        cmd.args(["-f", "-30d", common::bin()]);
        cmd.args(w.args("sweep", &w.dest(), &["--no-progress"]));
        let run = run_command(&mut cmd);
        run.assert_code(2);
        assert!(run.stderr.contains("clock skew"), "needs faketime (apt-get install faketime): {run}");
        assert!(!w.work.manifest.exists());
        assert!(server.list("preflight/").is_empty(), "nothing written");
        // The secret never reaches the output.
        let mut cmd = command();
        server.apply_env(&mut cmd);
        cmd.env("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdef");
        cmd.args(w.args("sweep", &w.dest(), &["--no-progress", "--log-level", "debug"]));
        let run = run_command(&mut cmd);
        assert!(!run.stderr.contains("wrong-secret") && !run.stdout.contains("wrong-secret"), "{run}");
    }

    fn names_s3_cannot_hold_are_unsupported_with_the_reason(server: &S3Server) {
        let w = S3Work::new(server, "names");
        w.work.write("fine.txt", b"fine");
        let long: String = (0..5).map(|i| format!("{}{i}/", "d".repeat(220))).collect();
        w.work.write(&format!("{long}deep.txt"), b"too deep for a key");
        w.work.write("bell\u{7}name.txt", b"control character");
        let run = w.sweep(&[]);
        assert_eq!(run.count("Skipped (unsupported)"), 2, "{run}");
        let status = w.status();
        assert_eq!(count(&status, "unsupported"), 2, "{status}");
        assert_eq!(count(&status, "verified"), 1, "{status}");
        let text = status.to_string();
        assert!(text.contains("1024"), "the key length reason: {text}");
        assert!(text.contains("control character"), "{text}");
        assert_eq!(server.list("names/").len(), 1);
    }

    fn dry_run_and_plan_write_nothing_and_estimate_the_cost(server: &S3Server) {
        let w = S3Work::new(server, "plan");
        common::small_tree(&w.work, 20, 2, 100, 200, 3);
        server.put(&w.key(&source_files(&w.work)[0].0), b"x");
        let dry = w.sweep(&["--dry-run"]);
        dry.assert_code(0);
        assert!(dry.stdout.contains("DRY RUN"), "{dry}");
        let plan = w.run("plan", &["--json"]);
        plan.assert_code(0);
        let value: serde_json::Value = serde_json::from_str(&plan.stdout).expect("JSON");
        assert_eq!(value["requests"]["put"], 19, "{value}");
        assert_eq!(value["requests"]["get"], 20, "{value}");
        assert!(value["cost"]["estimate_usd"]["requests_once"].as_f64().unwrap() > 0.0, "{value}");
        let human = w.run("plan", &["--price-put-per-1000", "5"]);
        assert!(human.stdout.contains("Estimated cost:     $0.0950 once"), "{human}");
        assert!(!w.work.manifest.exists());
        assert_eq!(server.list("plan/").len(), 1, "only the object put by the test");
    }

    fn killed_at_random_moments_the_sweep_resumes_and_leaves_nothing_behind(server: &S3Server) {
        let w = S3Work::new(server, "crash");
        common::small_tree(&w.work, 400, 4, 100, 3000, 21);
        for i in 0..3 {
            w.work.write(&format!("big/video-{i}.mp4"), &common::pseudo_random(9 * 1024 * 1024 + i, 40 + i as u64));
        }
        let flags = [
            "--no-progress", "--concurrency", "8", "--batch-size", "40", "--lease-timeout", "2s",
            "--s3-multipart-threshold", "6MiB", "--s3-part-size", "5MiB",
        ];
        let mut rng = common::XorShift::new(99);
        for _ in 0..8 {
            let mut cmd = command();
            server.apply_env(&mut cmd);
            cmd.args(w.args("sweep", &w.dest(), &flags))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().expect("start sweep");
            std::thread::sleep(Duration::from_millis(rng.range(30, 900)));
            let _ = child.kill();
            let _ = child.wait();
        }
        let run = w.sweep(&flags[1..]);
        run.assert_code(0);
        let status = w.status();
        assert_eq!(count(&status, "verified"), 403, "{status}");
        w.assert_dest_matches_source();
    }
}

/// Tests that need a server that checks what s3s-fs 0.14 does not (part checksums).
mod garage_only {
    use super::*;

    #[test]
    #[ignore = "needs Garage: .ci/run sets CUTOVERFS_TEST_GARAGE and runs these with --ignored"]
    fn a_corrupted_part_aborts_the_upload_and_leaves_nothing() {
        let server = S3Server::start(Kind::Garage);
        let w = S3Work::new(&server, "bad-part");
        let marker = b"CUTOVERFS-CORRUPT-ME-";
        // The marker sits in the second 5 MiB part only.
        let mut content = common::pseudo_random(12 * 1024 * 1024, 8);
        let at = 7 * 1024 * 1024;
        for (i, byte) in marker.iter().cycle().take(64 * 1024).enumerate() {
            content[at + i] = *byte;
        }
        w.work.write("video.mp4", &content);
        let proxy = CorruptingProxy::start(&server.endpoint(), marker, usize::MAX);
        let dest = w.dest_through(&proxy.endpoint());
        let run = w.run_with_dest(
            "sweep",
            &dest,
            &[
                "--no-progress",
                "--retry-delay",
                "10ms",
                "--max-retries",
                "1",
                "--s3-multipart-threshold",
                "6MiB",
                "--s3-part-size",
                "5MiB",
            ],
        );
        run.assert_code(1);
        assert!(proxy.corrupted() > 0);
        assert_eq!(count(&w.status(), "failed"), 1);
        assert!(
            server.get(&w.key("video.mp4")).is_none(),
            "nothing at the key"
        );
        assert!(
            server.multipart_uploads().is_empty(),
            "the uploads were aborted"
        );
    }
}
