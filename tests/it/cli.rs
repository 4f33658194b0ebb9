//! The CLI as a process against a node as a process: what an operator and a member do.

use crate::support::*;

#[test]
fn register_then_whoami() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("alice");
    let h = home.to_str().unwrap();
    let args = [
        "register",
        "+1 (415) 555-0100",
        "--server",
        &node.addr,
        "--code",
        CODE,
    ];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        stdout(&out).contains("registered +1 415-555-0100"),
        "{}",
        show(&args, &out)
    );

    let out = node.cli(&home, &["whoami"], "");
    assert!(
        out.status.success(),
        "{}",
        show(&["--home", h, "whoami"], &out)
    );
    let text = stdout(&out);
    assert_eq!(text.lines().next(), Some(ALICE), "{text}");
    assert!(text.contains(&node.addr), "{text}");
    assert!(text.contains(&node.fingerprint.to_string()), "{text}");
}

#[test]
fn home_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("alice");
    let out = node.cli(
        &home,
        &["register", ALICE, "--server", &node.addr, "--code", CODE],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home), 0o700);
    for name in [
        "device.key",
        "device.crt",
        "state.toml",
        "e2e.key",
        "home.db",
    ] {
        assert_eq!(mode(&home.join(name)), 0o600, "{name}");
    }
    // And everything else in it (the database's write-ahead log and shared memory).
    for entry in std::fs::read_dir(&home).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    assert_eq!(mode(&node.data_dir()), 0o700);
    assert_eq!(mode(&node.data_dir().join("tls/key.pem")), 0o600);
}

#[test]
fn five_wrong_codes_kill_the_code_even_for_the_right_one() {
    // No cooldown, so the test can ask for a second code straight away.
    let node = ProcessNode::start(&config_text("[verification]\nresend_cooldown_secs = 0\n"));
    let home = node.dir.path().join("bob");
    let args = ["register", BOB, "--server", &node.addr];
    let out = node.cli(
        &home,
        &args,
        "000000\n111111\n222222\n333333\n444444\n123456\n",
    );
    assert!(!out.status.success(), "{}", show(&args, &out));
    let err = stderr(&out);
    for left in [
        "4 tries left",
        "3 tries left",
        "2 tries left",
        "1 try left",
        "no tries left",
    ] {
        assert!(
            err.contains(left),
            "missing {left:?}: {}",
            show(&args, &out)
        );
    }
    assert!(
        err.contains("too many wrong codes"),
        "{}",
        show(&args, &out)
    );
    assert!(
        err.contains("dead even if it is right"),
        "{}",
        show(&args, &out)
    );
    assert!(
        !home.join("state.toml").exists(),
        "a refused registration saved state"
    );

    // The number has no account: registering it now creates one (no takeover).
    let args = ["register", BOB, "--server", &node.addr, "--code", CODE];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        !stdout(&out).contains("moved to this device"),
        "{}",
        show(&args, &out)
    );
}

#[test]
fn wrong_code_then_right_code_on_stdin_registers() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("carol");
    let args = ["register", "+1 415 555 0102", "--server", &node.addr];
    let out = node.cli(&home, &args, "654321\n\n 123-456 \n");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        stderr(&out).contains("4 tries left"),
        "{}",
        show(&args, &out)
    );
}

#[test]
fn real_code_from_the_log_provider_verifies() {
    // A number that is not a test number: its code is random and goes to the log.
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("dave");
    let number = "+442079460958";
    let mut child = std::process::Command::new(BIN)
        .args([
            "--home",
            home.to_str().unwrap(),
            "register",
            "0044 20 7946 0958",
        ])
        .args(["--server", &node.addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let code = wait_for_logged_code(&node, number);
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{code}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        show(&["register", number], &out)
    );
    let who = node.cli(&home, &["whoami"], "");
    assert_eq!(stdout(&who).lines().next(), Some(number));
}

/// An interrupted `register` leaves its code pending: `register --code` with it
/// registers, without asking for (and waiting for) another.
#[test]
fn register_with_the_code_in_hand_uses_the_pending_one() {
    let node = ProcessNode::start(&config_text(""));
    let number = "+14155550177";
    let home = node.dir.path().join("dave");
    // Asked for a code, then stopped before typing it (stdin closed).
    let args = ["register", number, "--server", &node.addr];
    let out = node.cli(&home, &args, "");
    assert!(!out.status.success(), "{}", show(&args, &out));
    let code = wait_for_logged_code(&node, number);
    let args = ["register", number, "--server", &node.addr, "--code", &code];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(
        !stderr(&out).contains("a code is on its way"),
        "a second code was asked for: {}",
        show(&args, &out)
    );
    assert_eq!(
        node.log().matches("verification code").count(),
        1,
        "{}",
        node.log()
    );
}

/// After a wrong registration-lock PIN the right code is still pending: trying again
/// with it and the right PIN registers at once, with no new code and no wait.
#[test]
fn after_a_wrong_pin_the_same_code_registers_with_the_right_one() {
    let node = ProcessNode::start(&config_text(""));
    let home = |name: &str| node.dir.path().join(name);
    node.register_cli(&home("a"), &[], BOB);
    let out = node.cli(&home("a"), &["lock", "set"], "2468\n2468\n");
    assert!(out.status.success(), "{}", show(&["lock", "set"], &out));
    let try_pin = |pin: &str| {
        let args = [
            "register", BOB, "--server", &node.addr, "--code", CODE, "--pin", pin,
        ];
        (node.cli(&home("b"), &args, ""), args.join(" "))
    };
    let (out, args) = try_pin("1357");
    assert!(
        stderr(&out).contains("wrong registration-lock PIN"),
        "{args}\n{}",
        stderr(&out)
    );
    let (out, args) = try_pin("2468");
    assert!(out.status.success(), "{args}\n{}", stderr(&out));
    assert!(stdout(&out).contains("moved to this device"));
}

/// Waits (bounded) until the node logs a code for `number` and returns it.
fn wait_for_logged_code(node: &ProcessNode, number: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = node.log();
        let found = log
            .lines()
            .filter(|l| l.contains("verification code") && l.contains(number))
            .find_map(|l| l.split("code=").nth(1).map(|c| c.trim().to_string()));
        if let Some(code) = found {
            return code;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no code logged for {number}:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn invalid_number_is_refused_and_nothing_is_stored() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("nobody");
    for bad in ["+1 23", "hello", "020 7946 0958"] {
        let args = ["register", bad, "--server", &node.addr];
        let out = node.cli(&home, &args, "123456\n");
        assert!(!out.status.success(), "{}", show(&args, &out));
        let err = stderr(&out);
        assert!(
            err.contains(bad) && err.contains("number"),
            "{}",
            show(&args, &out)
        );
    }
    let args = [
        "register",
        "020 7946 0958",
        "--region",
        "XX",
        "--server",
        &node.addr,
    ];
    let out = node.cli(&home, &args, "");
    assert!(
        stderr(&out).contains("not a region"),
        "{}",
        show(&args, &out)
    );
    assert!(!home.exists(), "the home was created for an invalid number");
    assert!(
        !node.log().contains("code requested"),
        "the node was asked:\n{}",
        node.log()
    );
}

#[test]
fn restart_keeps_accounts_and_a_new_certificate_is_refused() {
    let mut node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("alice");
    let out = node.cli(
        &home,
        &["register", ALICE, "--server", &node.addr, "--code", CODE],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));

    node.restart();
    let out = node.cli(&home, &["whoami"], "");
    assert!(out.status.success(), "{}", show(&["whoami"], &out));
    assert_eq!(stdout(&out).lines().next(), Some(ALICE));

    // Same data, new certificate: the client must refuse the node.
    assert!(node.stop());
    std::fs::remove_dir_all(node.data_dir().join("tls")).unwrap();
    node.restart();
    let out = node.cli(&home, &["whoami"], "");
    assert!(!out.status.success(), "{}", show(&["whoami"], &out));
    let err = stderr(&out);
    assert!(
        err.contains("pinned") && err.contains("refusing"),
        "{}",
        show(&["whoami"], &out)
    );
}

#[test]
fn fingerprint_given_up_front_is_enforced() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("alice");
    let wrong = format!("sha256:{}", "00".repeat(32));
    let args = [
        "register",
        ALICE,
        "--server",
        &node.addr,
        "--code",
        CODE,
        "--fingerprint",
        &wrong,
    ];
    let out = node.cli(&home, &args, "");
    assert!(!out.status.success(), "{}", show(&args, &out));
    assert!(stderr(&out).contains("pinned"), "{}", show(&args, &out));
    let right = node.fingerprint.to_string();
    let args = [
        "register",
        ALICE,
        "--server",
        &node.addr,
        "--code",
        CODE,
        "--fingerprint",
        &right,
    ];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
}

#[test]
fn whoami_without_registration_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&dir.path().join("empty"), &["whoami"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("switchboard register"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_connections = \"lots\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("limits.max_connections"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "a bad config still created the data dir"
    );
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let mut node = ProcessNode::start(&config_text(""));
    assert!(
        node.stop(),
        "node exited non-zero on SIGTERM\n{}",
        node.log()
    );
    assert!(node.log().contains("storage flushed"), "{}", node.log());
}

#[test]
fn a_passphrase_encrypts_the_keys_at_rest() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("alice");
    let pass_file = node.dir.path().join("pass");
    std::fs::write(&pass_file, "correct horse battery staple\n").unwrap();
    let pass = pass_file.to_str().unwrap();
    let out = node.register_cli(&home, &["--passphrase-file", pass], ALICE);
    assert!(!stderr(&out).contains("not encrypted"), "{}", stderr(&out));
    for name in ["device.key", "e2e.key"] {
        let bytes = std::fs::read(home.join(name)).unwrap();
        assert!(bytes.starts_with(b"SBSEAL1\n"), "{name} is not sealed");
        assert!(!String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"));
    }

    // Without the passphrase the keys stay locked, with a clear error.
    let out = node.cli(&home, &["whoami"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is encrypted: set SWITCHBOARD_PASSPHRASE"),
        "{}",
        show(&["whoami"], &out)
    );
    // A wrong one is refused.
    let wrong = node.dir.path().join("wrong");
    std::fs::write(&wrong, "tr0ub4dor&3").unwrap();
    let args = ["--passphrase-file", wrong.to_str().unwrap(), "whoami"];
    let out = node.cli(&home, &args, "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        show(&args, &out)
    );
    // The right one, from the environment this time, unlocks them.
    let out = std::process::Command::new(BIN)
        .args(["--home", home.to_str().unwrap(), "whoami"])
        .env("SWITCHBOARD_PASSPHRASE", "correct horse battery staple")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&["whoami"], &out));
    assert_eq!(stdout(&out).lines().next(), Some(ALICE));
}

#[test]
fn plain_keys_are_sealed_once_a_passphrase_is_given() {
    let node = ProcessNode::start(&config_text(""));
    let home = node.dir.path().join("bob");
    let out = node.register_cli(&home, &[], BOB);
    assert!(stderr(&out).contains("not encrypted"), "{}", stderr(&out));
    assert!(
        !std::fs::read(home.join("device.key"))
            .unwrap()
            .starts_with(b"SBSEAL1")
    );

    let pass_file = node.dir.path().join("pass");
    std::fs::write(&pass_file, "hunter2 but longer").unwrap();
    let args = ["--passphrase-file", pass_file.to_str().unwrap(), "recv"];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    for name in ["device.key", "e2e.key"] {
        assert!(
            std::fs::read(home.join(name))
                .unwrap()
                .starts_with(b"SBSEAL1\n"),
            "{name} was not sealed"
        );
    }
    let args = ["--passphrase-file", pass_file.to_str().unwrap(), "whoami"];
    let out = node.cli(&home, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
}

#[test]
fn no_secret_reaches_the_node_log_even_at_trace_level() {
    let node = ProcessNode::start_traced(&config_text(""));
    let pass_file = node.dir.path().join("pass");
    std::fs::write(&pass_file, "a passphrase nobody logs").unwrap();
    let pass = pass_file.to_str().unwrap();
    for (who, number) in [("alice", ALICE), ("bob", BOB)] {
        node.register_cli(
            &node.dir.path().join(who),
            &["--passphrase-file", pass],
            number,
        );
    }
    let alice = node.dir.path().join("alice");
    let bob = node.dir.path().join("bob");
    let args = [
        "--passphrase-file",
        pass,
        "send",
        BOB,
        "meet at the old mill",
    ];
    let out = node.cli(&alice, &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
    let args = ["--passphrase-file", pass, "recv"];
    let out = node.cli(&bob, &args, "");
    assert!(
        stdout(&out).contains("meet at the old mill"),
        "{}",
        show(&args, &out)
    );

    let log = node.log();
    assert!(log.len() > 10_000, "the trace log is suspiciously short");
    let node_key = std::fs::read_to_string(node.data_dir().join("tls").join("key.pem")).unwrap();
    let key_body: String = node_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let device_key = std::fs::read(alice.join("device.key")).unwrap();
    for (what, secret) in [
        ("the passphrase", "a passphrase nobody logs".to_string()),
        ("the message text", "meet at the old mill".to_string()),
        ("a PEM private key", "PRIVATE KEY".to_string()),
        ("the node's TLS key", key_body[..32].to_string()),
        ("the sealed device key", hex::encode(&device_key[40..56])),
    ] {
        assert!(!log.contains(&secret), "the node logged {what}");
    }
    // A six-digit code can turn up by chance as the microseconds of a
    // timestamp or inside a number, so it is looked for as a word of its own
    // in each line after its timestamp.
    let code_lines: Vec<&str> = log
        .lines()
        .filter(|line| {
            let rest = line.split_once(' ').map_or("", |(_, rest)| rest);
            rest.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| word == CODE)
        })
        .collect();
    assert!(
        code_lines.is_empty(),
        "the node logged the verification code: {code_lines:?}"
    );
}

#[test]
fn registering_on_a_new_home_signs_the_old_home_out() {
    let node = ProcessNode::start(&config_text(""));
    let old = node.dir.path().join("bob-old-phone");
    let new = node.dir.path().join("bob-new-phone");
    node.register_cli(&old, &[], BOB);
    let out = node.register_cli(&new, &[], BOB);
    assert!(
        stdout(&out).contains("moved to this device; its other devices are signed out"),
        "{}",
        stdout(&out)
    );
    let out = node.cli(&old, &["whoami"], "");
    assert!(!out.status.success(), "{}", show(&["whoami"], &out));
    assert!(
        stderr(&out).contains("signed out: its number was registered on another device"),
        "{}",
        show(&["whoami"], &out)
    );
    let out = node.cli(&new, &["whoami"], "");
    assert_eq!(stdout(&out).lines().next(), Some(BOB));
}

#[test]
fn a_registration_lock_needs_its_pin_to_take_the_number_over() {
    let node = ProcessNode::start(&config_text("[verification]\nresend_cooldown_secs = 0\n"));
    let home = |name: &str| node.dir.path().join(name);
    node.register_cli(&home("a"), &[], BOB);
    let out = node.cli(&home("a"), &["lock", "set"], "2468\n2468\n");
    assert!(out.status.success(), "{}", show(&["lock", "set"], &out));
    assert!(stdout(&out).contains("lapses if your devices stay away for 7 days"));

    // Without the PIN: refused, and the old home keeps the number.
    let args = ["register", BOB, "--server", &node.addr, "--code", CODE];
    let out = node.cli(&home("b"), &args, "");
    assert!(!out.status.success(), "{}", show(&args, &out));
    assert!(
        stderr(&out)
            .contains("registration lock: registering it needs its PIN as well (5 tries left)"),
        "{}",
        show(&args, &out)
    );
    // A wrong PIN costs a try.
    let wrong = [
        "register", BOB, "--server", &node.addr, "--code", CODE, "--pin", "1357",
    ];
    let out = node.cli(&home("b"), &wrong, "");
    assert!(
        stderr(&out).contains("wrong registration-lock PIN; 4 tries left"),
        "{}",
        show(&wrong, &out)
    );
    assert_eq!(
        stdout(&node.cli(&home("a"), &["whoami"], ""))
            .lines()
            .next(),
        Some(BOB)
    );

    // With the PIN (asked for on stdin, as a person would type it): taken over.
    let out = node.cli(&home("b"), &args, "2468\n");
    assert!(out.status.success(), "{}", show(&args, &out));
    assert!(stdout(&out).contains("moved to this device"));
    assert!(!node.cli(&home("a"), &["whoami"], "").status.success());

    // The lock stays with the account until it is cleared.
    let out = node.cli(&home("c"), &args, "");
    assert!(
        stderr(&out).contains("registration lock"),
        "{}",
        show(&args, &out)
    );
    let out = node.cli(&home("b"), &["lock", "clear"], "");
    assert!(
        stdout(&out).contains("registration lock cleared"),
        "{}",
        show(&["lock"], &out)
    );
    let out = node.cli(&home("c"), &args, "");
    assert!(out.status.success(), "{}", show(&args, &out));
}

#[test]
fn a_registration_lock_lapses_when_the_devices_stay_away() {
    // Lapse after 0 days: the lock is already lapsed when the next device comes.
    let node = ProcessNode::start(&config_text(
        "[verification]\nlock_lapse_days = 0\nresend_cooldown_secs = 0\n",
    ));
    node.register_cli(&node.dir.path().join("a"), &[], CAROL);
    let out = node.cli(&node.dir.path().join("a"), &["lock", "set"], "8642\n8642\n");
    assert!(out.status.success(), "{}", show(&["lock", "set"], &out));
    let out = node.register_cli(&node.dir.path().join("b"), &[], CAROL);
    assert!(stdout(&out).contains("moved to this device"));
    // A lapsed lock is gone for good.
    let out = node.register_cli(&node.dir.path().join("c"), &[], CAROL);
    assert!(stdout(&out).contains("moved to this device"));
}
