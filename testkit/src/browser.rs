//! Headless Chromium driven through WebDriver for the web page's tests: a `chromedriver`
//! process on a free port (Debian's `chromium` and `chromium-driver` packages, installed by
//! scripts/install-deps.sh) and a `fantoccini` session on it; both end when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{find_binary, free_port};

/// What a machine without the browser needs.
pub const CHROMIUM_INSTALL_HINT: &str = "chromedriver not found: install Debian's packages with \
     `apt-get install -y chromium chromium-driver` (or run scripts/install-deps.sh)";
/// Longest wait for chromedriver to answer after its start.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|n| find_binary(n))
        .or_else(|| {
            let p = PathBuf::from("/usr/lib/chromium/chromium");
            p.is_file().then_some(p)
        })
}

/// A chromedriver process and one headless browser session.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    /// The browser's profile, removed with the handle.
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width` x `height` pixels.
    ///
    /// # Errors
    /// chromedriver or chromium is missing (with the install command), or does not start.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let driver_bin = find_binary("chromedriver")
            .or_else(|| {
                let p = PathBuf::from("/usr/bin/chromedriver");
                p.is_file().then_some(p)
            })
            .context(CHROMIUM_INSTALL_HINT)?;
        let browser_bin = chromium().context(CHROMIUM_INSTALL_HINT)?;
        let port = free_port()?;
        let mut driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir()?;
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser_bin,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }))?;
        let started = std::time::Instant::now();
        let client = loop {
            // chromedriver is on loopback: plain HTTP.
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let attempt = fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await;
            match attempt {
                Ok(c) => break c,
                Err(e) if started.elapsed() < DRIVER_START_TIMEOUT => {
                    if let Ok(Some(status)) = driver.try_wait() {
                        bail!("chromedriver exited ({status}) before a session: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    let _ = driver.kill();
                    bail!("no WebDriver session within {DRIVER_START_TIMEOUT:?}: {e}");
                }
            }
        };
        client.set_window_size(width, height).await?;
        Ok(Browser {
            client,
            driver,
            _profile: profile,
        })
    }

    /// Saves a PNG screenshot of the page at `path` (folders created).
    ///
    /// # Errors
    /// The browser or the file system fails.
    pub async fn screenshot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let png = self.client.screenshot().await?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    ///
    /// # Errors
    /// The script throws or the browser fails.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        Ok(self.client.execute(script, args).await?)
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
