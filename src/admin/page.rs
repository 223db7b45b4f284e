//! The web page at `/`: the live journal and applied feed (`GET /api/feed`) with filters
//! and the partner table (`GET /api/status`, polled). Its three files are built into the
//! binary (no build step, nothing fetched from elsewhere) and served without a token: they
//! hold no data, and every request the page makes carries the token it asks for once and
//! keeps in `sessionStorage`.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
use actix_web::HttpResponse;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/feed.js");
const STYLE: &str = include_str!("page/feed.css");
/// Only the node's own files and connections (`connect-src 'self'` covers ws:// and wss://
/// to the same host in current browsers).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((CONTENT_SECURITY_POLICY, POLICY))
        .insert_header((X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// `GET /`.
pub async fn index() -> HttpResponse {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/feed.js`.
pub async fn script() -> HttpResponse {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/feed.css`.
pub async fn style() -> HttpResponse {
    file("text/css; charset=utf-8", STYLE)
}
