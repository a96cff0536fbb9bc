//! `--files-from` / `--files-from0` (issue 18): the application's own list of files restricts
//! `plan`, `sweep`, `verify` and `purge` to the listed paths, and `plan` reports what the list
//! and the tree disagree on (orphans, dangling references) in text and JSON. A bad list refuses
//! the command before anything changes.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use serde_json::Value;

use common::*;

/// The tree: five files in two folders, (path, size).
const TREE: [(&str, usize); 5] = [
    ("docs/a.pdf", 100),
    ("docs/b.pdf", 200),
    ("docs/c.pdf", 300),
    ("media/x.jpg", 1000),
    ("media/y.jpg", 2000),
];

/// The application's list: three files of the tree and two rows whose file is gone, with a
/// comment, an empty line, a CRLF line end and a duplicate, as a database dump may have them.
const LIST: &str = "# every FileField of every model\n\
                    docs/a.pdf\r\n\
                    docs/c.pdf\n\
                    \n\
                    media/x.jpg\n\
                    ; another comment\n\
                    gone/1.pdf\n\
                    docs/a.pdf\n\
                    gone/2.pdf\n";

const LISTED_PRESENT: [&str; 3] = ["docs/a.pdf", "docs/c.pdf", "media/x.jpg"];

fn seed_tree(w: &Work) {
    for (i, (path, size)) in TREE.iter().enumerate() {
        w.write(path, &pseudo_random(*size, i as u64));
    }
}

fn content(path: &str) -> Vec<u8> {
    let i = TREE.iter().position(|(p, _)| *p == path).unwrap();
    pseudo_random(TREE[i].1, i as u64)
}

fn write_list(w: &Work, name: &str, text: &[u8]) -> PathBuf {
    let path = w.root.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{run}"))
}

fn names_of(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Files present at the dest, by relative path.
fn dest_files(w: &Work) -> BTreeSet<String> {
    common::cutover::files_below(&w.dest).into_keys().collect()
}

/// Runs `cutoverfs <words>` with `input` on its stdin.
fn run_with_stdin(words: Vec<OsString>, input: &[u8]) -> Run {
    let started = Instant::now();
    let mut child = command()
        .args(words)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start cutoverfs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    wait_capturing(child, started, COMMAND_TIMEOUT)
}

#[test]
fn plan_reports_orphans_and_dangling_references_in_text_and_json_and_writes_nothing() {
    let w = Work::new();
    seed_tree(&w);
    let list = write_list(&w, "list.txt", LIST.as_bytes());

    let run = w.cmd("plan", &["--json", "--files-from", arg(&list)]);
    run.assert_code(0);
    let plan = json(&run);
    let report = &plan["files_from"];
    assert_eq!(report["list"], arg(&list), "{plan:#}");
    assert_eq!(report["listed"], 5, "duplicates count once: {plan:#}");
    assert_eq!(report["orphans"]["files"], 2, "{plan:#}");
    assert_eq!(report["orphans"]["bytes"], 2200, "{plan:#}");
    assert_eq!(
        names_of(&report["orphans"]["paths"]),
        ["docs/b.pdf", "media/y.jpg"]
    );
    assert_eq!(report["dangling"]["files"], 2, "{plan:#}");
    assert_eq!(report["dangling"]["bytes"], 0, "never seen: {plan:#}");
    assert_eq!(
        names_of(&report["dangling"]["paths"]),
        ["gone/1.pdf", "gone/2.pdf"]
    );
    // What a sweep would do: copy the three listed files, find the two dangling ones missing.
    assert_eq!(plan["by_fate"]["copy"]["files"], 3, "{plan:#}");
    assert_eq!(plan["by_fate"]["copy"]["bytes"], 1400, "{plan:#}");
    assert_eq!(plan["by_fate"]["missing"]["files"], 2, "{plan:#}");
    assert!(!w.manifest.exists(), "plan created the manifest");
    assert!(!w.dest.exists(), "plan created the dest");

    let text = w.cmd("plan", &["--files-from", arg(&list)]);
    text.assert_code(0);
    for line in [
        "[orphan] docs/b.pdf",
        "[orphan] media/y.jpg",
        "[dangling] gone/1.pdf",
        "[dangling] gone/2.pdf",
    ] {
        assert!(text.stdout.contains(line), "no {line:?}\n{text}");
    }
    let orphans = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Orphans"))
        .unwrap_or_else(|| panic!("no orphans line\n{text}"));
    assert!(
        orphans.contains(" 2 files") && orphans.contains("2.1 KiB"),
        "{orphans}"
    );
    let dangling = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Dangling"))
        .unwrap_or_else(|| panic!("no dangling line\n{text}"));
    assert!(dangling.contains(" 2 files"), "{dangling}");

    // Only the first names with --show-paths; the counts stay whole.
    let short = w.cmd("plan", &["--files-from", arg(&list), "--show-paths", "1"]);
    short.assert_code(0);
    assert!(short.stdout.contains("[orphan] docs/b.pdf"), "{short}");
    assert!(!short.stdout.contains("[orphan] media/y.jpg"), "{short}");
    assert!(
        short.stdout.contains("... and 1 more orphan paths"),
        "{short}"
    );

    // Globs and the list must both take a path: the rows outside docs/ are neither orphans nor
    // dangling.
    let scoped = json(&w.cmd(
        "plan",
        &["--json", "--files-from", arg(&list), "--include", "docs/**"],
    ));
    let report = &scoped["files_from"];
    assert_eq!(names_of(&report["orphans"]["paths"]), ["docs/b.pdf"]);
    assert_eq!(report["dangling"]["files"], 0, "{scoped:#}");
    assert_eq!(scoped["files"]["files"], 2, "{scoped:#}");
    assert!(!w.manifest.exists(), "plan created the manifest");
}

#[test]
fn a_list_on_stdin_and_a_nul_separated_list_name_the_same_files() {
    let w = Work::new();
    seed_tree(&w);
    // Names only a NUL-separated list can hold, and one with a space.
    w.write("odd/new\nline.txt", b"newline");
    w.write("odd/with space.txt", b"space");

    let mut words: Vec<OsString> = vec!["plan".into()];
    words.extend(w.target());
    words.extend(["--json".into(), "--files-from".into(), "-".into()]);
    let run = run_with_stdin(words, LIST.as_bytes());
    run.assert_code(0);
    let plan = json(&run);
    assert_eq!(plan["files_from"]["list"], "-", "{plan:#}");
    assert_eq!(plan["files_from"]["listed"], 5, "{plan:#}");
    assert_eq!(plan["files_from"]["orphans"]["files"], 4, "{plan:#}");
    assert_eq!(plan["files_from"]["dangling"]["files"], 2, "{plan:#}");

    let list0 = write_list(
        &w,
        "list0",
        b"odd/new\nline.txt\0odd/with space.txt\0docs/a.pdf\0",
    );
    w.sweep(&["--files-from0", arg(&list0)]).assert_code(0);
    assert_eq!(
        dest_files(&w),
        BTreeSet::from(["docs/a.pdf", "odd/new\nline.txt", "odd/with space.txt"].map(String::from)),
    );
}

both_engines! {
    fn sweep_copies_only_the_listed_files_and_counts_dangling_rows_as_missing() {
        let w = Work::new();
        seed_tree(&w);
        let list = write_list(&w, "list.txt", LIST.as_bytes());

        let dry = w.sweep(&["--files-from", arg(&list), "--dry-run"]);
        dry.assert_code(0);
        assert_eq!(dry.count("Successfully copied"), 3, "{dry}");
        assert_eq!(dry.count("Missing"), 2, "{dry}");

        // Dangling rows are missing files: errors, unless --skip-missing.
        let run = w.sweep(&["--files-from", arg(&list)]);
        run.assert_code(1);
        assert_eq!(run.count("Total files processed"), 5, "{run}");
        assert_eq!(run.count("Successfully copied"), 3, "{run}");
        assert_eq!(run.count("Missing"), 2, "{run}");
        assert_eq!(run.count("Errors"), 2, "{run}");
        for gone in ["gone/1.pdf", "gone/2.pdf"] {
            assert!(
                run.stdout.contains(&format!("[MISSING] Source file does not exist: {gone}")),
                "{run}"
            );
        }
        assert_eq!(
            dest_files(&w),
            BTreeSet::from(LISTED_PRESENT.map(String::from)),
            "only the listed files are copied"
        );
        for path in LISTED_PRESENT {
            assert_eq!(fs::read(w.dest.join(path)).unwrap(), content(path), "{path}");
        }
        // The others are scanned, and left for a sweep without the list.
        let status = w.status();
        assert_eq!(state_count(&status, "files", "verified"), 3, "{status}");
        assert_eq!(state_count(&status, "files", "pending"), 2, "{status}");

        let skip = w.sweep(&["--files-from", arg(&list), "--skip-missing"]);
        skip.assert_code(0);
        assert_eq!(skip.count("Skipped (missing)"), 2, "{skip}");
        assert_eq!(skip.count("Errors"), 0, "{skip}");
        assert!(skip.stdout.contains("[SKIP] Source file does not exist: gone/1.pdf"), "{skip}");

        // A listed file that vanished after its copy is dangling, with the bytes last recorded.
        fs::remove_file(w.src.join("docs/c.pdf")).unwrap();
        let plan = json(&w.cmd_manifest_only("plan", &["--json", "--files-from", arg(&list)]));
        let dangling = &plan["files_from"]["dangling"];
        assert_eq!(dangling["files"], 3, "{plan:#}");
        assert_eq!(dangling["bytes"], 300, "{plan:#}");
        assert_eq!(names_of(&dangling["paths"]), ["docs/c.pdf", "gone/1.pdf", "gone/2.pdf"]);

        // Without the list, the rest is copied.
        w.sweep(&[]).assert_code(1);
        assert_eq!(dest_files(&w).len(), 5);
    }

    fn verify_checks_only_the_listed_files() {
        let w = Work::new();
        seed_tree(&w);
        w.sweep(&[]).assert_code(0);
        flip_byte(&w.dest.join("docs/b.pdf"));
        flip_byte(&w.dest.join("media/x.jpg"));
        let list = write_list(&w, "list.txt", b"docs/a.pdf\nmedia/x.jpg\n");

        let run = w.cmd(
            "verify",
            &["--no-progress", "--deep", "--format", "json", "--files-from", arg(&list)],
        );
        run.assert_code(1);
        let report = json(&run);
        assert_eq!(report["checked"], 2, "{report:#}");
        let found: Vec<&str> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert_eq!(found, ["media/x.jpg"], "the unlisted docs/b.pdf is not checked");

        let only_a = write_list(&w, "only-a.txt", b"docs/a.pdf\n");
        let clean = w.cmd("verify", &["--no-progress", "--deep", "--files-from", arg(&only_a)]);
        clean.assert_code(0);
        assert_eq!(clean.count("Files checked"), 1, "{clean}");

        // The unlisted broken copy is still recorded verified: nothing was checked there.
        let status = w.status();
        assert_eq!(state_count(&status, "files", "verified"), 4, "{status}");
        assert_eq!(state_count(&status, "files", "pending"), 1, "{status}");
    }

    fn purge_deletes_only_listed_local_copies_and_keeps_its_safety_rules() {
        let w = Work::new();
        seed_tree(&w);
        w.sweep(&[]).assert_code(0);
        // A listed file changed locally since its copy: purge must refuse it.
        fs::OpenOptions::new()
            .append(true)
            .open(w.src.join("docs/c.pdf"))
            .unwrap()
            .write_all(b"changed")
            .unwrap();
        let list = write_list(&w, "list.txt", LIST.as_bytes());

        let dry = w.cmd("purge", &["--files-from", arg(&list)]);
        dry.assert_code(1);
        assert_eq!(dry.count("Would delete"), 2, "{dry}");
        for (path, _) in TREE {
            assert!(w.src.join(path).exists(), "a dry run deleted {path}");
        }

        let run = w.cmd("purge", &["--files-from", arg(&list), "--confirm"]);
        run.assert_code(1);
        assert_eq!(run.count("Local copies deleted"), 2, "{run}");
        assert_eq!(run.count("Refused"), 1, "{run}");
        assert!(run.stdout.contains("docs/c.pdf"), "{run}");
        for gone in ["docs/a.pdf", "media/x.jpg"] {
            assert!(!w.src.join(gone).exists(), "{gone} not purged\n{run}");
            assert_eq!(fs::read(w.dest.join(gone)).unwrap(), content(gone));
        }
        for kept in ["docs/b.pdf", "media/y.jpg"] {
            assert_eq!(fs::read(w.src.join(kept)).unwrap(), content(kept), "unlisted {kept} purged");
        }
        assert!(w.src.join("docs/c.pdf").exists(), "changed local copy purged");

        // Purged files live at the dest: neither missing for plan nor dangling for the list.
        let plan = json(&w.cmd_manifest_only("plan", &["--json", "--files-from", arg(&list)]));
        assert_eq!(plan["files_from"]["dangling"]["files"], 2, "{plan:#}");
        assert_eq!(names_of(&plan["files_from"]["dangling"]["paths"]), ["gone/1.pdf", "gone/2.pdf"]);
        let all = json(&w.cmd_manifest_only("plan", &["--json"]));
        assert!(all["by_state"].get("missing").is_none(), "purged files planned as missing: {all:#}");
    }
}

fn flip_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    bytes[10] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_bad_list_is_refused_naming_the_line_and_changes_nothing() {
    let w = Work::new();
    seed_tree(&w);
    let cases: [(&[u8], &str); 6] = [
        (
            b"docs/a.pdf\n/srv/media/docs/b.pdf\n",
            "line 2: \"/srv/media/docs/b.pdf\" is absolute",
        ),
        (
            b"docs/a.pdf\n# ok\ndocs/../../etc/passwd\n",
            "line 3: \"docs/../../etc/passwd\" has a '..' component",
        ),
        (
            b"./docs/a.pdf\n",
            "line 1: \"./docs/a.pdf\" has a '.' component",
        ),
        (
            b"docs//a.pdf\n",
            "line 1: \"docs//a.pdf\" has an empty component",
        ),
        (b"docs/\n", "line 1: \"docs/\" has an empty component"),
        (
            b"docs/\xff.pdf\n",
            "line 1: \"docs/\u{fffd}.pdf\" is not UTF-8",
        ),
    ];
    for (text, expected) in cases {
        let list = write_list(&w, "bad.txt", text);
        let no_flag: &[&str] = &[];
        for (cmd, extra) in [
            ("sweep", &["--no-progress"][..]),
            ("plan", no_flag),
            ("verify", &["--no-progress"][..]),
            ("purge", &["--confirm"][..]),
        ] {
            let run = w.cmd(cmd, &[&["--files-from", arg(&list)][..], extra].concat());
            run.assert_code(2);
            assert!(
                run.stderr
                    .contains(&format!("file list {}, {expected}", arg(&list))),
                "{cmd}: want {expected:?}\n{run}"
            );
        }
        assert!(!w.manifest.exists(), "a bad list created the manifest");
        assert!(!w.dest.exists(), "a bad list created the dest");
    }
    let missing = w.root.join("no-such-list.txt");
    let run = w.sweep(&["--files-from", arg(&missing)]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains(&format!("cannot read the file list {}", arg(&missing))),
        "{run}"
    );
    let good = write_list(&w, "good.txt", b"docs/a.pdf\n");
    let both = w.sweep(&["--files-from", arg(&good), "--files-from0", arg(&good)]);
    both.assert_code(2);
    assert!(both.stderr.contains("cannot be used with"), "{both}");
    assert!(!w.manifest.exists() && !w.dest.exists());

    // With a migration under way: a bad list changes neither the manifest nor a local copy.
    w.sweep(&[]).assert_code(0);
    let before = fs::read(&w.manifest).unwrap();
    let bad = write_list(&w, "bad.txt", b"docs/a.pdf\n../x\n");
    for cmd in [
        &["purge", "--confirm"][..],
        &["verify", "--no-progress"][..],
        &["sweep", "--no-progress"][..],
    ] {
        let run = w.cmd(
            cmd[0],
            &[&cmd[1..], &["--files-from", arg(&bad)][..]].concat(),
        );
        run.assert_code(2);
        assert!(run.stderr.contains("line 2"), "{run}");
    }
    assert_eq!(
        fs::read(&w.manifest).unwrap(),
        before,
        "the manifest changed"
    );
    for (path, _) in TREE {
        assert_eq!(fs::read(w.src.join(path)).unwrap(), content(path), "{path}");
    }
}

/// A list of a million paths (a large application's database) is read and compared with the
/// tree in a few seconds: nothing is quadratic in the list's length.
#[test]
fn a_list_of_a_million_paths_plans_in_seconds() {
    let w = Work::new();
    seed_tree(&w);
    let mut text = String::with_capacity(40 << 20);
    for i in 0..1_000_000u32 {
        text.push_str(&format!(
            "uploads/{:03}/{:03}/file-{i}.jpg\n",
            i % 997,
            i % 113
        ));
    }
    text.push_str("docs/a.pdf\n");
    let list = write_list(&w, "million.txt", text.as_bytes());
    let started = Instant::now();
    let run = w.cmd("plan", &["--json", "--files-from", arg(&list)]);
    run.assert_code(0);
    let plan = json(&run);
    assert_eq!(plan["files_from"]["listed"], 1_000_001, "{}", run.stderr);
    assert_eq!(plan["files_from"]["dangling"]["files"], 1_000_000);
    assert_eq!(
        plan["files_from"]["dangling"]["paths"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    assert_eq!(plan["files_from"]["orphans"]["files"], 4);
    assert!(
        started.elapsed().as_secs() < 60,
        "plan of a million-path list took {:?}",
        started.elapsed()
    );
}

/// The Django one-liner of docs/sweep.md, run as written by a real Django on a project with an
/// `ImageField`, two `FileField`s on one model, empty and NULL values and a proxy model, prints
/// exactly the referenced names, which `plan --files-from -` then compares with the tree.
#[test]
#[ignore = "Django tier: needs CUTOVERFS_TEST_PYTHON (a python with Django); .ci/run runs it"]
fn the_documented_django_one_liner_lists_every_file_field() {
    let python = django_python("django");
    let w = Work::new();
    let project = w.root.join("project");
    let settings = format!(
        "SECRET_KEY = 'test'\n\
         INSTALLED_APPS = ['django.contrib.contenttypes', 'django.contrib.auth', 'app']\n\
         DATABASES = {{'default': {{'ENGINE': 'django.db.backends.sqlite3', 'NAME': {db:?}}}}}\n\
         MEDIA_ROOT = {media:?}\n\
         DEFAULT_AUTO_FIELD = 'django.db.models.AutoField'\n\
         # ImageField without Pillow: these tests only read names.\n\
         SILENCED_SYSTEM_CHECKS = ['fields.E210']\n",
        db = project.join("db.sqlite3").to_str().unwrap(),
        media = w.src.to_str().unwrap(),
    );
    write_file(&project.join("settings.py"), settings.as_bytes());
    write_file(
        &project.join("manage.py"),
        b"import os, sys\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings')\n\
          from django.core.management import execute_from_command_line\n\
          execute_from_command_line(sys.argv)\n",
    );
    write_file(&project.join("app/__init__.py"), b"");
    write_file(
        &project.join("app/models.py"),
        b"from django.db import models\n\
          class Expense(models.Model):\n    image = models.ImageField(upload_to='missions', blank=True, null=True)\n\
          class Contract(models.Model):\n    document = models.FileField(upload_to='contracts')\n    appendix = models.FileField(upload_to='contracts', blank=True)\n\
          class ContractProxy(Contract):\n    class Meta:\n        proxy = True\n",
    );
    let manage = |args: &[&str]| {
        let out = std::process::Command::new(&python)
            .arg("manage.py")
            .args(args)
            .current_dir(&project)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "manage.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    manage(&["makemigrations", "app", "-v", "0"]);
    manage(&["migrate", "-v", "0"]);
    manage(&[
        "shell",
        "-v",
        "0",
        "-c",
        "from app.models import Expense, Contract\n\
         Expense.objects.create(image='missions/R1/receipt.jpg')\n\
         Expense.objects.create(image=None)\n\
         Expense.objects.create(image='')\n\
         Contract.objects.create(document='contracts/R5/contract.pdf', appendix='contracts/a b.pdf')\n\
         Contract.objects.create(document='contracts/gone.pdf')\n",
    ]);
    w.write("missions/R1/receipt.jpg", b"receipt");
    w.write("contracts/R5/contract.pdf", b"contract");
    w.write("contracts/a b.pdf", b"appendix");
    w.write("missions/R1/replaced.jpg", b"an orphan");

    let doc =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/sweep.md")).unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("python manage.py shell"))
        .expect("docs/sweep.md has no `python manage.py shell` line");
    let snippet = line
        .strip_prefix("python manage.py shell -v 0 -c \"")
        .and_then(|rest| rest.strip_suffix("\" > media-files.txt"))
        .unwrap_or_else(|| panic!("unexpected form of the documented command: {line}"));
    let listed = manage(&["shell", "-v", "0", "-c", snippet]);
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "contracts/R5/contract.pdf",
            "contracts/a b.pdf",
            "contracts/gone.pdf",
            "missions/R1/receipt.jpg"
        ],
        "{listed}"
    );

    let mut words: Vec<OsString> = vec!["plan".into()];
    words.extend(w.target());
    words.extend(["--json".into(), "--files-from".into(), "-".into()]);
    let plan = json(&run_with_stdin(words, listed.as_bytes()));
    let report = &plan["files_from"];
    assert_eq!(
        names_of(&report["orphans"]["paths"]),
        ["missions/R1/replaced.jpg"],
        "{plan:#}"
    );
    assert_eq!(
        names_of(&report["dangling"]["paths"]),
        ["contracts/gone.pdf"],
        "{plan:#}"
    );
}
