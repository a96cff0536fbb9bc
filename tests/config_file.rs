//! `--config FILE` (DESIGN §7): the flags' settings from TOML, per command tables, and the
//! command line winning over the file.

mod common;

use common::*;

fn config(w: &Work, body: &str) -> std::path::PathBuf {
    let path = w.root.join("cutoverfs.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn a_config_file_gives_the_flags_and_the_command_line_wins() {
    let w = Work::new();
    w.write("a/one.txt", b"one");
    w.write("b/two.txt", b"two");
    let file = config(
        &w,
        &format!(
            "source = {:?}\ndest = {:?}\nmanifest = {:?}\nexclude = [\"b/**\"]\n\n[sweep]\nbatch-size = 7\nno-progress = true\n\n[status]\njson = true\n",
            w.src.display().to_string(),
            file_url(&w.root.join("not-this-one")),
            w.manifest_url()
        ),
    );
    let file = file.to_str().unwrap();
    // The command line's dest beats the file's.
    let dest = w.dest_url();
    let swept = run(["--config", file, "sweep", "--dest", dest.as_str()]);
    swept.assert_code(0);
    assert!(!w.root.join("not-this-one").exists());
    assert!(w.dest.join("a/one.txt").exists());
    assert!(
        !w.dest.join("b/two.txt").exists(),
        "exclude from the file applies"
    );
    // The [status] table only applies to status: JSON without --json.
    let status = run(["--config", file, "status", "--dest", dest.as_str()]);
    status.assert_code(0);
    let value: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(value["files"]["verified"], 1);
}

#[test]
fn unknown_keys_and_bad_files_are_named() {
    let w = Work::new();
    for (body, says) in [
        ("concurency = 4\n", "unknown key `concurency`"),
        ("[sweep]\njson = true\n", "unknown key `json` for `sweep`"),
        ("dry-run = \"yes\"\n", "is a switch"),
        ("[sweep]\nbatch-size = 0\n", "--batch-size"),
        ("this is not toml", "not valid TOML"),
    ] {
        let file = config(&w, body);
        let run = run(["--config", file.to_str().unwrap(), "sweep"]);
        run.assert_code(2);
        assert!(run.stderr.contains(says), "{body:?}: {run}");
        assert!(!w.manifest.exists());
    }
    let missing = run(["--config", "/nonexistent/cutoverfs.toml", "status"]);
    missing.assert_code(2);
    assert!(
        missing.stderr.contains("cannot read config file"),
        "{missing}"
    );
}
