//! `switchboard chat` in a real terminal: tmux runs it (`send-keys` types,
//! `capture-pane` reads the screen) against a real node, with a second client on the
//! other side using the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

/// A tmux server of its own (its socket in a temp dir), killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(dir: &Path, width: u16, height: u16, command: &str) -> Option<Tmux> {
        let socket = dir.join("tmux.sock");
        let ok = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args([
                "new-session",
                "-d",
                "-s",
                "chat",
                "-x",
                &width.to_string(),
                "-y",
            ])
            .arg(height.to_string())
            .arg(command)
            .status()
            .ok()?
            .success();
        ok.then_some(Tmux { socket })
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "chat"])
    }

    /// Waits (up to 30 s) until the screen no longer shows `what`: the app took the
    /// keys before it (an Escape followed at once by more keys reads as Alt and a key).
    fn wait_gone(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if !screen.contains(what) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the screen still shows {what:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to 30 s) until the screen shows `what`; the screen then.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if screen.contains(what) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

/// Alice chats with Bob in `switchboard chat`: she opens their conversation, types a
/// message and presses Enter; Bob's `recv` prints it; his reply appears in her pane
/// without a key pressed, and her message shows as delivered. At 40 columns the
/// conversation and the compose line are still there.
#[test]
fn alice_chats_with_bob_in_a_real_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let (alice, bob) = (root.join("alice"), root.join("bob"));
    node.register_cli(&alice, &[], ALICE);
    node.register_cli(&bob, &[], BOB);
    let out = node.cli(&bob, &["send", ALICE, "hi Alice"], "");
    assert!(out.status.success(), "{}", show(&["send"], &out));

    let command = format!(
        "{BIN} --home {} chat 2> {}",
        alice.display(),
        root.join("chat.err").display()
    );
    let Some(tmux) = Tmux::start(&root, 100, 30, &command) else {
        println!("skipped: tmux could not start a session here");
        return;
    };
    let screen = tmux.wait_for("hi Alice");
    assert!(screen.contains(BOB), "{screen}");
    assert!(screen.contains("connected"), "{screen}");
    // Open the conversation, type, send.
    tmux.keys(&["Enter"]);
    tmux.wait_for("message (Enter sends)");
    tmux.keys(&["-l", "hello from the chat app"]);
    tmux.wait_for("hello from the chat app");
    tmux.keys(&["Enter"]);
    tmux.wait_for("you: hello from the chat app");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = String::new();
    while !got.contains("hello from the chat app") {
        assert!(
            Instant::now() < deadline,
            "Bob's recv never printed it: {got}"
        );
        let out = node.cli(&bob, &["recv"], "");
        got.push_str(&stdout(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Bob answers; it shows in Alice's pane with no key pressed, and her message is
    // delivered (✓✓), read even (she is looking at the conversation, he ran recv).
    let out = node.cli(&bob, &["send", ALICE, "reply from Bob"], "");
    assert!(out.status.success(), "{}", show(&["send"], &out));
    let screen = tmux.wait_for("reply from Bob");
    let screen = if screen.contains("hello from the chat app ✓✓") {
        screen
    } else {
        tmux.wait_for("hello from the chat app ✓✓")
    };
    assert!(
        screen.contains(&format!("{BOB}: reply from Bob")),
        "{screen}"
    );

    // 40 columns: the conversation and the compose line are still on the screen.
    tmux.tmux(&["resize-window", "-t", "chat", "-x", "40", "-y", "20"]);
    let narrow = tmux.wait_for("message (Enter");
    assert!(
        narrow.contains("reply from Bob") || narrow.contains("reply from"),
        "{narrow}"
    );
    assert!(narrow.lines().all(|l| l.chars().count() <= 40), "{narrow}");
    // Esc to the list, q quits.
    tmux.keys(&["Escape"]);
    tmux.wait_for("Chats");
    tmux.keys(&["q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.tmux(&["list-sessions"]).contains("chat") {
        assert!(
            Instant::now() < deadline,
            "chat did not quit:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A group in `switchboard chat`: each sender shows by name (Carol's from her
/// profile), `/info` lists the members and the admin, `/save` downloads a file sent
/// to the group, and what Alice types reaches the others.
#[test]
fn a_group_in_a_real_terminal_shows_names_info_and_files() {
    if Command::new("tmux").arg("-V").output().is_err() {
        println!("skipped: tmux is not installed (.ci/run installs it)");
        return;
    }
    let node = ProcessNode::start(&config_text(""));
    let root = node.dir.path().to_path_buf();
    let (alice, bob, carol) = (
        node.home("alice", ALICE),
        node.home("bob", BOB),
        node.home("carol", CAROL),
    );
    node.ok(&carol, &["profile", "set", "--name", "Carol"]);
    node.ok(&bob, &["group", "create", "Trio", ALICE, CAROL]);
    node.ok(&carol, &["recv"]);
    node.ok(&carol, &["send", "--group", "Trio", "carol here"]);
    let notes = root.join("notes.txt");
    std::fs::write(&notes, "bring snacks\n").unwrap();
    let file_id = node
        .ok(
            &bob,
            &[
                "send",
                "--group",
                "Trio",
                "--file",
                notes.to_str().unwrap(),
                "--caption",
                "the plan",
            ],
        )
        .trim()
        .to_string();

    let command = format!(
        "{BIN} --home {} chat 2> {}",
        alice.display(),
        root.join("chat.err").display()
    );
    let Some(tmux) = Tmux::start(&root, 110, 30, &command) else {
        println!("skipped: tmux could not start a session here");
        return;
    };
    tmux.wait_for("Trio");
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("Carol: carol here");
    assert!(
        screen.contains(&format!("{BOB}: [file: notes.txt, 13 B] the plan")),
        "{screen}"
    );
    // The members, with the admin marked.
    tmux.keys(&["-l", "/info"]);
    tmux.keys(&["Enter"]);
    let info = tmux.wait_for("3 members");
    assert!(info.contains(&format!("({BOB}) · admin")), "{info}");
    assert!(info.contains(&format!("Carol ({CAROL})")), "{info}");
    tmux.keys(&["Escape"]);
    tmux.wait_gone("3 members");
    // The file, saved into the home's attachments folder.
    tmux.keys(&["-l", &format!("/save {}", &file_id[..8])]);
    tmux.keys(&["Enter"]);
    tmux.wait_for("saved ");
    assert_eq!(
        std::fs::read_to_string(alice.join("attachments").join("notes.txt")).unwrap(),
        "bring snacks\n"
    );
    // Alice writes to the group; Carol gets it.
    tmux.keys(&["-l", "see you all"]);
    tmux.keys(&["Enter"]);
    tmux.wait_for("you: see you all");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = String::new();
    while !got.contains("see you all") {
        assert!(Instant::now() < deadline, "Carol never got it: {got}");
        got.push_str(&node.ok(&carol, &["recv"]));
        std::thread::sleep(Duration::from_millis(200));
    }
    tmux.keys(&["C-c"]);
}
