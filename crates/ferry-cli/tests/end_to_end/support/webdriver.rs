//! A browser session over the W3C WebDriver protocol (JSON over HTTP) with a local
//! `chromedriver`: the handful of commands the dashboard tests use.
//!
//! The protocol needs no more than the HTTP helper the other tests use; a client crate for it
//! brought a dozen dependencies whose features differ from the `ferry` binary's, so building the
//! tests and then running `cargo run --bin ferry` recompiled most of the workspace.

use std::time::Duration;

use serde_json::{Value, json};

use super::http_request;

/// How long a browser command may take (starting the browser is the slowest).
const BROWSER_ANSWERS_WITHIN: Duration = Duration::from_secs(60);

/// The key under which WebDriver names an element.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser session; ended on drop.
pub struct Browser {
    port: u16,
    session: String,
}

impl Browser {
    /// Starts a headless Chromium through the `chromedriver` listening on loopback `port`.
    pub fn start(port: u16) -> Browser {
        let capabilities = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1300,1000"]}}}});
        let answer = call(port, "POST", "/session", &capabilities)
            .unwrap_or_else(|e| panic!("a headless chromium session: {e}"));
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("a session id in {answer}"))
            .to_string();
        Browser { port, session }
    }

    /// Sends one command of this session; its `value`, or the driver's error.
    fn command(&self, method: &str, path: &str, body: &Value) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        call(self.port, method, &path, body)
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", &json!({ "url": url }))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub fn execute(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            &json!({"script": script, "args": []}),
        )
        .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// The id of the element `css` selects.
    fn element(&self, css: &str) -> String {
        let found = self
            .command(
                "POST",
                "/element",
                &json!({"using": "css selector", "value": css}),
            )
            .unwrap_or_else(|e| panic!("element {css}: {e}"));
        found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("an element id in {found}"))
            .to_string()
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) {
        let element = self.element(css);
        self.command("POST", &format!("/element/{element}/click"), &json!({}))
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into the element `css` selects.
    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.command(
            "POST",
            &format!("/element/{element}/value"),
            &json!({ "text": text }),
        )
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// The page as a PNG image.
    pub fn screenshot(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        let png = self.command("GET", "/screenshot", &Value::Null)?;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .map_err(|e| format!("not a base64 PNG: {e}"))
    }

    /// The text of the open alert, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        let text = self.command("GET", "/alert/text", &Value::Null).ok()?;
        Some(text.as_str().unwrap_or_default().to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.command("DELETE", "", &Value::Null);
    }
}

/// One WebDriver request to the driver on `port` (`body` null: none); the answer's `value`
/// on success, its error and message otherwise.
fn call(port: u16, method: &str, path: &str, body: &Value) -> Result<Value, String> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (code, answer) = http_request(port, method, path, "", &body, BROWSER_ANSWERS_WITHIN);
    let answer: Value = serde_json::from_str(&answer)
        .map_err(|e| format!("HTTP {code}, not JSON ({e}): {answer}"))?;
    let value = answer["value"].clone();
    if code == 200 {
        Ok(value)
    } else {
        Err(format!(
            "HTTP {code}: {} ({})",
            value["error"], value["message"]
        ))
    }
}
