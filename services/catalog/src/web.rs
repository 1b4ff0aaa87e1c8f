//! The catalog explorer: a browser UI served from the binary itself, so it
//! works offline and cannot drift from the API it calls. The pages hold no
//! data and no privilege: everything they show comes from `/v1/...` with the
//! user's own bearer token, so the API's grants and masks are the only rules.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// No inline script or style, no other origin: an injected string in a
/// product description cannot run, and the page cannot call anywhere else.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

const INDEX: &str = include_str!("../web/index.html");

/// Every asset by name; a name not here is a 404 (no file system lookup,
/// so no path can escape).
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../web/app.js")),
    ("api.js", JS, include_str!("../web/api.js")),
    ("dom.js", JS, include_str!("../web/dom.js")),
    ("products.js", JS, include_str!("../web/products.js")),
    ("product.js", JS, include_str!("../web/product.js")),
    ("lineage.js", JS, include_str!("../web/lineage.js")),
    ("sql.js", JS, include_str!("../web/sql.js")),
    ("audit.js", JS, include_str!("../web/audit.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../web/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../web/favicon.svg"),
    ),
];

const JS: &str = "text/javascript; charset=utf-8";

pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX) }),
        )
        .route("/assets/{file}", get(asset))
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => page(content_type, body),
        None => {
            let mut r = (StatusCode::NOT_FOUND, "no such asset").into_response();
            secure(&mut r);
            r
        }
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    // Assets change with the binary; revalidating is cheap next to a stale UI
    // talking to a newer API.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(&mut r);
    r
}

fn secure(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_carry_the_policy_and_assets_their_type() {
        let r = page("text/html; charset=utf-8", INDEX);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(r.headers()[header::REFERRER_POLICY], "no-referrer");
        let r = asset(Path("app.js".into())).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], JS);
        let r = asset(Path("style.css".into())).await;
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/css")
        );
    }

    #[tokio::test]
    async fn unknown_assets_are_not_found() {
        for name in ["nope.js", "../api.rs", "..", ""] {
            let r = asset(Path(name.into())).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{name}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        }
    }

    #[test]
    fn no_page_has_inline_script_or_style() {
        // The policy would block them; this says which file to fix.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        assert!(!INDEX.contains("<style"));
        for (name, _, body) in ASSETS {
            assert!(
                !body.contains("innerHTML"),
                "{name}: build nodes, not HTML strings"
            );
        }
    }
}
