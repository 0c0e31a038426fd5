//! The admin listener's status page, loaded by a real headless browser (Chromium,
//! installed by the test when missing): its script reads `/status` and fills the class
//! rows with live figures. The page needs nothing but the admin API.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_finds_the_class_rows_filled_in() {
    let chromium = tools::ensure("chromium", "chromium");
    let (_b, backend) = backend(16, 1, &[]);
    let cfg = format!(
        r#"
[listener]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[backend]]
name = "app"
addresses = ["{backend}"]
[[class]]
name = "premium"
backend = "app"
[[class]]
name = "basic"
backend = "app"
[[chain]]
name = "main"
default = {{ class = "basic" }}
[[chain.rule]]
id = "p"
path_prefix = "/p"
target = {{ class = "premium" }}
"#
    );
    let (_g, gw, admin, _) = gateway(&cfg, &[], &[]);
    // Load while the page is open.
    let load = tokio::spawn(async move {
        let mut c = Client::connect(gw, None).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < until {
            let _ = c.get("/p/x", &[]).await;
            let _ = c.get("/b/x", &[]).await;
        }
    });
    let page = get_once(admin, "/", &[]).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("<script>") && !html.contains("src=\"http"),
        "the page loads nothing from outside"
    );
    let profile = temp_path("chromium-profile");
    let url = format!("http://{admin}/");
    let dom = tokio::task::spawn_blocking(move || {
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=4000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .output()
            .expect("run chromium")
    })
    .await
    .expect("chromium task");
    load.abort();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for class in ["premium", "basic"] {
        let row = dom
            .split("<tr")
            .find(|r| r.contains(&format!("data-class=\"{class}\"")))
            .unwrap_or_else(|| panic!("no row for {class} in the page:\n{dom}"));
        let cells: Vec<&str> = row.split("<td").skip(1).collect();
        assert!(cells.len() >= 10, "{row}");
        // The last cell is the class's arrivals so far: a number above zero.
        let arrivals: f64 = cells[9]
            .trim_start_matches(|c| c != '>')
            .trim_start_matches('>')
            .split('<')
            .next()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no arrivals figure in {row}"));
        assert!(arrivals > 0.0, "{class}: {row}");
    }
    assert!(
        dom.contains("in service"),
        "the summary line was not filled in"
    );
}
