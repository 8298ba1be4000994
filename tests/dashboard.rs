//! The web dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`),
//! driven over WebDriver: sign in with the admin token, see the app the test deployed, watch
//! a rolling update reach every replica, undo it from the page, see the events; a viewer's
//! token may look but its undo is refused; signing out forgets the token.
//!
//! `SHOAL_SCREENSHOT=PATH cargo test --test dashboard` also saves the app page as a PNG
//! (the README's screenshot comes from there).

mod common;

use common::{Cluster, example_spec, write_spec};
use fantoccini::{Client, ClientBuilder, Locator};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `chromedriver` on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; `make test` installs it)");
        // It says when it listens.
        let lines = common::read_lines(&mut child);
        common::wait_line(&lines, "ChromeDriver was started successfully");
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session: it trusts the cluster's self-signed CA by taking any
/// certificate, as a user would click through.
async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let capabilities = serde_json::json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--ignore-certificate-errors", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("no WebDriver session: {e}"))
}

/// Waits until the element at `css` exists and its text satisfies `ok`; its text.
async fn text_until(client: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    // Looks again every 100 ms until the deadline.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < deadline {
        tick.tick().await;
        if let Ok(element) = client.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if ok(&text) {
                return text;
            }
            last = text;
        }
    }
    panic!("{css} never showed what was expected; last: {last:?}");
}

async fn click(client: &Client, css: &str) {
    client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn sign_in(client: &Client, token: &str) {
    let field = client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("#token"))
        .await
        .unwrap();
    field.send_keys(token).await.unwrap();
    click(client, "#signin-button").await;
}

fn hello_spec(dir: &std::path::Path, greeting: &str) -> String {
    let text = example_spec("hello", 2, greeting);
    write_spec(dir, "hello.toml", &text)
        .to_str()
        .unwrap()
        .to_string()
}

/// `f`'s blocking work (the CLI, blocking HTTP) off the async workers' backs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[test]
fn the_dashboard_signs_in_shows_a_rollout_undoes_it_and_keeps_to_roles() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(dashboard());
}

async fn dashboard() {
    let site = tempfile::tempdir().unwrap();
    let spec = hello_spec(site.path(), "Hello from Shoal!");
    let c = blocking(|| Cluster::start_with(&["--apply", &spec]));
    let viewer_file = site.path().join("viewer.token");
    blocking(|| {
        c.cli_ok(&[
            "token",
            "create",
            "viewer",
            "--role",
            "viewer",
            "--write",
            viewer_file.to_str().unwrap(),
        ])
    });
    let viewer = std::fs::read_to_string(&viewer_file).unwrap();
    let driver = Driver::start();
    let client = browser(&driver, &site.path().join("chromium")).await;

    // The API's address leads to the dashboard, which asks for a token first.
    client.goto(&c.api).await.unwrap();
    sign_in(&client, &c.token).await;
    text_until(&client, "tr[data-app='hello'] .ready", |t| t == "2/2").await;
    text_until(&client, "#nodes-table", |t| t.contains("Ready")).await;
    text_until(&client, "#events-table", |t| t.contains("Scheduled")).await;

    // The app's page: its replicas on their node, revision 1.
    click(&client, "tr[data-app='hello'] a").await;
    text_until(&client, "#app-name", |t| t == "hello").await;
    text_until(&client, "#revision", |t| t == "1").await;
    text_until(&client, "#replicas-table", |t| {
        t.matches("Ready").count() == 2
    })
    .await;

    // A rolling update, applied from the CLI, shows up and runs to the end.
    let again = hello_spec(site.path(), "Hello again");
    blocking(|| c.cli_ok(&["apply", "-f", &again]));
    text_until(&client, "#revision", |t| t == "2").await;
    text_until(&client, "#rollout-revisions tr[data-revision='2']", |t| {
        t.split_whitespace().collect::<Vec<_>>() == ["2", "2", "2"]
    })
    .await;
    text_until(&client, "#revisions-table", |t| {
        t.contains("env.GREETING changed")
    })
    .await;
    // Requests show up in the page's numbers.
    blocking(|| {
        for _ in 0..20 {
            assert_eq!(c.gw("/hello").status(), 200);
        }
    });
    text_until(&client, "#logs", |t| t.contains("hello: GET /hello")).await;
    text_until(&client, "#rps b", |t| {
        t.parse::<f64>().is_ok_and(|r| r > 0.0)
    })
    .await;
    if let Ok(path) = std::env::var("SHOAL_SCREENSHOT") {
        std::fs::write(path, client.screenshot().await.unwrap()).unwrap();
    }
    let png = client.screenshot().await.unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // Undo from the page: revision 3 runs revision 1's template again.
    click(&client, "button[data-action='undo']").await;
    text_until(&client, "#revision", |t| t == "3").await;
    text_until(&client, "#revisions-table", |t| {
        t.contains("rollback to revision 1")
    })
    .await;
    text_until(&client, "#events-table", |t| t.contains("RolledBack")).await;
    blocking(|| c.wait_gw("/hello", 200, "Hello from Shoal!"));

    // An empty replicas box is no 0: refused on the page (set and clicked at once, before a
    // refresh fills the box again), the app left as it is, and the banner stays through the
    // refreshes until the page changes.
    client
        .execute(
            "document.querySelector('#scale-replicas').value = ''; \
             document.querySelector(\"button[data-action='scale']\").click();",
            vec![],
        )
        .await
        .unwrap();
    text_until(&client, "#error", |t| t.contains("whole number")).await;
    let replicas = blocking(|| c.api_json("/v1/apps/hello"))["app"]["spec"]["replicas"].clone();
    assert_eq!(replicas, 2);
    // An address whose name does not decode says so, and leaves the page working.
    let go = |hash: &str| format!("location.hash = '{hash}'");
    client.execute(&go("#/app/%E0%A4%A"), vec![]).await.unwrap();
    text_until(&client, "#error", |t| t.contains("not an address")).await;
    text_until(&client, "#apps-table", |t| t.contains("hello")).await;
    client.execute(&go("#/app/hello"), vec![]).await.unwrap();
    text_until(&client, "#error", |t| t.is_empty()).await;
    text_until(&client, "#revision", |t| t == "3").await;

    // Signing out forgets the token; a viewer may look but not undo.
    click(&client, "#signout").await;
    let kept = client
        .execute("return sessionStorage.getItem('shoal-token')", vec![])
        .await
        .unwrap();
    assert!(kept.is_null(), "{kept}");
    // Signed in again, the page the address names (the app's) comes back.
    sign_in(&client, viewer.trim()).await;
    text_until(&client, "#revision", |t| t == "3").await;
    click(&client, "button[data-action='undo']").await;
    text_until(&client, "#error", |t| t.contains("forbidden")).await;
    text_until(&client, "#revision", |t| t == "3").await;

    // A wrong token is refused at sign-in.
    click(&client, "#signout").await;
    sign_in(&client, "not-a-token").await;
    text_until(&client, "#error", |t| t.contains("refused")).await;

    // A token kept to one namespace signs in with that namespace typed in first, and the
    // pages then show that namespace.
    let scoped_file = site.path().join("scoped.token");
    blocking(|| {
        c.cli_ok(&[
            "token",
            "create",
            "team-view",
            "--role",
            "viewer",
            "--scope",
            "team-a",
            "--write",
            scoped_file.to_str().unwrap(),
        ])
    });
    let scoped = std::fs::read_to_string(&scoped_file).unwrap();
    client
        .execute("location.hash = '#/'", vec![])
        .await
        .unwrap();
    let field = client.find(Locator::Css("#namespace")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys("team-a").await.unwrap();
    sign_in(&client, scoped.trim()).await;
    text_until(&client, "#apps-table", |t| t.contains("NAME")).await;
    text_until(&client, "#error", |t| t.is_empty()).await;
    client.close().await.unwrap();
    blocking(move || drop(c));
}
