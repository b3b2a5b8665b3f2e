//! A real browser drives `examples/web_login.rs` end to end (issue #15, item 5): headless
//! Chromium, through ChromeDriver, opens the app, follows "Log in with Genesys" to the fake's
//! login page, picks a user, submits, sees that user's name (fetched by the app through
//! `UserTokenCache::layer`), and logs out. Two browsers with separate profiles are logged in
//! at once as two users, and each sees its own name throughout. A forged callback is
//! refused, and a logged-out session's cookie logs nobody in.
//!
//! **Ignored by default** (`cargo test --workspace` must pass on a machine without a
//! browser). `.ci/run` installs Debian's `chromium` and `chromium-driver` and runs it:
//!
//! ```text
//! cargo test -p genesys-auth-suite --test browser -- --ignored
//! ```
//!
//! It finds `chromium` (or `chromium-browser`, `google-chrome`) and `chromedriver` on the
//! `PATH`, or at the paths in `CHROMIUM` and `CHROMEDRIVER`, and fails saying so if either is
//! missing. It starts ChromeDriver itself on a free loopback port; the app and the fake run
//! in-process, the app being the example's own code (included with `#[path]`).
//!
//! The WebDriver client is the few W3C WebDriver commands the test needs, as JSON over the
//! suite's hyper client: no WebDriver crate and its dependencies for ten endpoints.

mod common;

#[path = "../examples/web_login.rs"]
#[allow(dead_code)]
mod web_login;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use genesys_fake::{FakeGenesys, FakeUser};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use common::{free_port, h1_client, HttpClient};

/// How long a command may wait for an element to appear (WebDriver's implicit wait).
const ELEMENT_WAIT: Duration = Duration::from_secs(20);
/// How long ChromeDriver may take to start answering.
const DRIVER_START: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver; .ci/run runs it with `-- --ignored`"]
async fn two_users_log_in_see_their_names_and_log_out_in_a_real_browser() {
    let started = Instant::now();
    let chromium = find_program(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let chromedriver = find_program("CHROMEDRIVER", &["chromedriver"]);

    // The fake and the app, in-process on loopback.
    let fake = FakeGenesys::start().await.expect("start the fake");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the app");
    let app_addr = listener.local_addr().unwrap();
    let genesys = web_login::Genesys::fake(&fake, app_addr);
    tokio::spawn(async move { web_login::serve(listener, genesys).await });
    let app = format!("http://{app_addr}");
    let [ada, grace, _] = <[FakeUser; 3]>::try_from(fake.users()).unwrap();

    let driver = Driver::start(&chromedriver).await;
    let first = driver.session(&chromium).await;
    let second = driver.session(&chromium).await;

    // A forged callback (a pending login, another state) is refused with a page, and logs
    // nobody in.
    first.open(&format!("{app}/login")).await;
    first.find("button#login").await;
    first
        .open(&format!("{app}/callback?code=forged&state=forged"))
        .await;
    let error = first.text("#error").await;
    assert!(error.starts_with("Login refused"), "{error}");
    assert!(first.cookie("session").await.is_none());

    // Ada logs in in the first browser, Grace in the second.
    let ada_session = log_in(&first, &app, &ada).await;
    let grace_session = log_in(&second, &app, &grace).await;
    assert_ne!(ada_session, grace_session);

    // Both logged in at once: each browser still shows its own user.
    for (browser, user) in [(&first, &ada), (&second, &grace)] {
        browser.open(&format!("{app}/")).await;
        assert_eq!(browser.text("#user-name").await, user.name);
    }

    // Ada logs out: the logged-out page, no session cookie, and the home page offers the
    // login again.
    log_out(&first, &app).await;
    let home = first.source().await;
    assert!(!home.contains(&ada.name), "{home}");
    // Her old session cookie, set again, is worth nothing: the app forgot the session.
    first.set_cookie("session", &ada_session).await;
    first.open(&format!("{app}/")).await;
    first.find("#login").await;
    let home = first.source().await;
    assert!(!home.contains(&ada.name), "{home}");

    // Grace is still logged in, and then logs out too.
    second.open(&format!("{app}/")).await;
    assert_eq!(second.text("#user-name").await, grace.name);
    log_out(&second, &app).await;

    first.close().await;
    second.close().await;
    drop(driver);
    fake.shutdown().await;
    println!("browser test: {:.1} s", started.elapsed().as_secs_f64());
}

/// Logs `user` in through the app and the fake's login page; returns the session cookie.
async fn log_in(browser: &Session<'_>, app: &str, user: &FakeUser) -> String {
    browser.open(&format!("{app}/")).await;
    browser.click("#login").await;
    // The fake's login page: pick the user, submit.
    browser
        .click(&format!("input[name=\"user_id\"][value=\"{}\"]", user.id))
        .await;
    browser.click("button#login").await;
    // Back on the app's home page, through `/callback`.
    assert_eq!(browser.text("#user-name").await, user.name);
    let cookie = browser
        .cookie("session")
        .await
        .expect("a session cookie after the login");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");
    assert_eq!(cookie["path"], "/", "{cookie}");
    cookie["value"].as_str().unwrap().to_owned()
}

/// Logs out and checks the logged-out page and home page.
async fn log_out(browser: &Session<'_>, app: &str) {
    browser.click("#logout").await;
    assert_eq!(browser.text("#logged-out").await, "You are logged out.");
    assert!(browser.cookie("session").await.is_none(), "cookie cleared");
    browser.open(&format!("{app}/")).await;
    assert_eq!(browser.text("#login").await, "Log in with Genesys");
}

/// `$ENV`, or the first of `names` on the `PATH`; fails with what to install.
fn find_program(env: &str, names: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{env}={} is not a file", path.display());
        return path;
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for name in names {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "{} not found on the PATH (nor set in {env}): this test needs Chromium and \
         ChromeDriver; on Debian: apt-get install -y chromium chromium-driver",
        names.join(" / ")
    );
}

/// A ChromeDriver process on a free loopback port, shut down on drop.
struct Driver {
    child: Child,
    base: String,
    http: HttpClient,
    profiles: std::sync::Mutex<Vec<PathBuf>>,
}

impl Driver {
    async fn start(program: &Path) -> Self {
        let port = free_port().await;
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let driver = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: h1_client(),
            profiles: Default::default(),
        };
        let deadline = Instant::now() + DRIVER_START;
        loop {
            if let Ok(status) = driver.call(Method::GET, "/status", None).await {
                if status["ready"] == true {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on port {port} within {DRIVER_START:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }

    /// A browser with a profile of its own (its own cookies).
    async fn session(&self, chromium: &Path) -> Session<'_> {
        let profile = std::env::temp_dir().join(format!(
            "genesys-web-login-{}-{}",
            std::process::id(),
            self.profiles.lock().unwrap().len()
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("create a browser profile directory");
        self.profiles.lock().unwrap().push(profile.clone());
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "pageLoadStrategy": "normal",
                "timeouts": { "implicit": ELEMENT_WAIT.as_millis() as u64, "pageLoad": 60_000, "script": 30_000 },
                "goog:chromeOptions": {
                    "binary": chromium,
                    // As root in a container: no sandbox; no calls to Google's services,
                    // which this machine's closed network refuses.
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--disable-dev-shm-usage",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                },
            }}
        });
        let value = self
            .call(Method::POST, "/session", Some(capabilities))
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start {}: {e}", chromium.display()));
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Session { driver: self, id }
    }

    /// One WebDriver command: its `value`, or the error WebDriver answered.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{method} {path}: {status}, not JSON ({e})"))?;
        let value = answer["value"].clone();
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status} {}: {}",
                value["error"], value["message"]
            ));
        }
        Ok(value)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // ChromeDriver closes its browsers as it stops; a kill would leave them running.
        if let Ok(mut stream) =
            std::net::TcpStream::connect(self.base.trim_start_matches("http://"))
        {
            use std::io::Write;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = stream.write_all(
                b"GET /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for profile in self.profiles.lock().unwrap().iter() {
            let _ = std::fs::remove_dir_all(profile);
        }
    }
}

/// One browser (a WebDriver session).
struct Session<'d> {
    driver: &'d Driver,
    id: String,
}

impl Session<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver
            .call(method, &path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn open(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element `css` selects, waiting up to [`ELEMENT_WAIT`] for it to appear.
    async fn find(&self, css: &str) -> String {
        let path = format!("/session/{}/element", self.id);
        let body = json!({ "using": "css selector", "value": css });
        match self.driver.call(Method::POST, &path, Some(body)).await {
            Ok(element) => element
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .expect("an element reference")
                .to_owned(),
            Err(e) => {
                let url = self.call(Method::GET, "/url", None).await;
                let source = self.source().await;
                panic!("no {css:?} on {url} within {ELEMENT_WAIT:?} ({e}); the page:\n{source}");
            }
        }
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        let text = self
            .call(Method::GET, &format!("/element/{element}/text"), None)
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    async fn source(&self) -> String {
        let source = self.call(Method::GET, "/source", None).await;
        source.as_str().unwrap_or_default().to_owned()
    }

    /// The cookie `name` of the current page, with its attributes.
    async fn cookie(&self, name: &str) -> Option<Value> {
        let path = format!("/session/{}/cookie/{name}", self.id);
        self.driver.call(Method::GET, &path, None).await.ok()
    }

    async fn set_cookie(&self, name: &str, value: &str) {
        let cookie =
            json!({ "cookie": { "name": name, "value": value, "path": "/", "httpOnly": true } });
        self.call(Method::POST, "/cookie", Some(cookie)).await;
    }

    async fn close(&self) {
        self.call(Method::DELETE, "", None).await;
    }
}
