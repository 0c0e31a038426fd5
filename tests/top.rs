//! `allot top` as a person runs it: in a real terminal (tmux) against a loaded gateway,
//! the screen shows the classes, a non-zero rate and a p99 delay; the keys switch views;
//! `q` quits with status 0 and gives the terminal back.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn config(backend: SocketAddr) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "gold"
backend = "app"
[[class]]
name = "bronze"
backend = "app"
max_running = 2
[[chain]]
name = "main"
default = {{ class = "bronze" }}
[[chain.rule]]
id = "gold"
path_prefix = "/gold/"
target = {{ class = "gold" }}
"#
    )
}

/// A tmux server of the test's own (its own socket), killed when dropped.
struct Tmux {
    bin: std::path::PathBuf,
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Polls the screen (bounded) until `check` holds; the last screen either way.
    fn wait_for(&self, limit: Duration, check: impl Fn(&str) -> bool) -> (bool, String) {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.screen();
            if check(&s) {
                return (true, s);
            }
            if Instant::now() > deadline {
                return (false, s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// A number in the column headed `column` of the row whose first word is `row`.
fn figure(screen: &str, row: &str, column: &str) -> Option<f64> {
    let head = screen
        .lines()
        .find(|l| l.contains(column) && l.contains("class"))?;
    let at = head.find(column)?;
    let line = screen
        .lines()
        .find(|l| l.trim_start_matches(['│', ' ']).split_whitespace().next() == Some(row))?;
    // The cell starts where its header does (columns are left aligned).
    let chars: Vec<char> = line.chars().collect();
    let head_chars = head[..at].chars().count();
    let cell: String = chars
        .iter()
        .skip(head_chars)
        .take_while(|c| **c != ' ')
        .collect();
    cell.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_classes_rates_and_p99_in_a_terminal_and_q_quits_with_0() {
    let bin = tools::ensure("tmux", "tmux");
    let (_b, backend_addr) = backend(16, 5, &[]);
    let (_g, gw, admin, _) = gateway(&config(backend_addr), &[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    for path in ["/gold/x", "/x", "/x", "/x", "/x"] {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut c = Client::connect(gw, None).await;
            while !stop.load(Relaxed) {
                if c.get(path, &[]).await.is_none() {
                    c = Client::connect(gw, None).await;
                }
            }
        });
    }

    let tmux = Tmux {
        bin,
        socket: format!("allot-top-test-{}", std::process::id()),
    };
    let done = temp_path("top-exit");
    let script = format!(
        "{} top --admin {admin} --interval-ms 300; echo $? > {}; sleep 60",
        allot_bin().display(),
        done.display()
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "45",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (ok, screen) = tmux.wait_for(Duration::from_secs(20), |s| {
        figure(s, "gold", "arrivals/s").is_some_and(|r| r > 0.0)
            && figure(s, "bronze", "p99 ms").is_some_and(|p| p > 0.0)
    });
    assert!(
        ok,
        "no classes with a rate and a p99 on the screen:\n{screen}"
    );
    assert!(screen.contains("p99 ms"), "{screen}");
    assert!(
        screen.contains("queueing delay p99 ms"),
        "the sparklines:\n{screen}"
    );

    // Views: back ends, then the cluster view.
    tmux.run(&["send-keys", "-t", "top", "2"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(5), |s| {
        s.contains("back end / address") && s.contains(&backend_addr.to_string())
    });
    assert!(ok, "back-end view:\n{screen}");
    // This gateway is in no cluster: the cluster view says so.
    tmux.run(&["send-keys", "-t", "top", "5"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(5), |s| s.contains("no cluster"));
    assert!(ok, "cluster view:\n{screen}");
    tmux.run(&["send-keys", "-t", "top", "p"]);
    let (ok, screen) = tmux.wait_for(Duration::from_secs(5), |s| s.contains("PAUSED"));
    assert!(ok, "pause:\n{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Ok(text) = std::fs::read_to_string(&done) {
            if !text.trim().is_empty() {
                break text.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "q did not quit:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, "0", "exit status of allot top");
    stop.store(true, Relaxed);
}

#[test]
fn top_refuses_an_unreachable_gateway_before_taking_the_terminal() {
    // A port nobody listens on: bind one, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let a = port.to_string();
    let (code, out, err) = run_allot(&["top", "--admin", &a], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&a), "{err}");
    assert!(
        !out.contains('\x1b'),
        "the terminal was not touched: {out:?}"
    );
}
