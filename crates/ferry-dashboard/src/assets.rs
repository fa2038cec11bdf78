//! The pages, built into the binary: nothing is fetched from elsewhere at run time.

/// One built-in file.
pub struct Asset {
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static str,
}

/// The page every dashboard address starts from.
pub const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_str!("../assets/index.html"),
};

/// The asset served at `/assets/{name}`, if there is one.
pub fn named(name: &str) -> Option<Asset> {
    let (content_type, body) = match name {
        "app.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../assets/app.js"),
        ),
        "charts.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../assets/charts.js"),
        ),
        "app.css" => ("text/css; charset=utf-8", include_str!("../assets/app.css")),
        "icon.svg" => ("image/svg+xml", include_str!("../assets/icon.svg")),
        _ => return None,
    };
    Some(Asset { content_type, body })
}
