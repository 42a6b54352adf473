//! Who may use the dashboard, its data API and `/metrics`: a request must
//! name one of the coordinator's host names in `Host` (no DNS rebinding),
//! and, when the cluster is secure, carry the dashboard token — as
//! `Authorization: Bearer <token>` (scripts, Prometheus) or in the
//! HttpOnly, SameSite=Strict cookie that `/login?token=…` sets (browsers).
//! Every answer carries a strict Content-Security-Policy.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const COOKIE: &str = "flamingo_dashboard";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const LOGIN_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>flamingo: sign in</title><link rel=\"stylesheet\" href=\"/assets/app.css\"></head><body><main><h1>flamingo</h1><p>The dashboard needs the cluster's dashboard token (<code>flamingoctl up</code> prints a sign-in link; the token is <code>pki/dashboard.token</code> in the cluster's state dir).</p><form method=\"get\" action=\"/login\"><input type=\"password\" name=\"token\" autocomplete=\"off\" autofocus> <button type=\"submit\">Sign in</button></form></main></body></html>";

/// The dashboard's access rules.
#[derive(Debug, Clone)]
pub struct DashboardAccess {
    /// `None`: no token needed (`--insecure`).
    pub token: Option<Arc<String>>,
    /// Host names (without port) a request may name.
    pub hosts: Arc<Vec<String>>,
}

/// `host[:port]` or `[v6]:port` → the host.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn presented(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    {
        return Some(bearer.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn query_token(request: &Request) -> Option<String> {
    request
        .uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "token")
        .map(|(_, value)| value.to_string())
}

fn refuse(status: StatusCode, path: &str, message: &str) -> Response {
    if path.starts_with("/api/") || path == "/metrics" {
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
    } else {
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            LOGIN_PAGE,
        )
            .into_response()
    }
}

pub async fn guard(
    State(access): State<DashboardAccess>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = check(&access, request, next).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn check(access: &DashboardAccess, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let name = host_name(host);
    if !access
        .hosts
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(name))
    {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            format!("host '{name}' is not one of this dashboard's names (start the coordinator with --http-host {name} to allow it)"),
        )
            .into_response();
    }
    let Some(token) = &access.token else {
        return next.run(request).await;
    };
    if path == "/login" {
        return match query_token(&request) {
            Some(given) if same(&given, token) => (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_string()),
                    (
                        header::SET_COOKIE,
                        format!("{COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/"),
                    ),
                ],
            )
                .into_response(),
            _ => refuse(StatusCode::UNAUTHORIZED, &path, "wrong or missing token"),
        };
    }
    if path == "/assets/app.css" {
        return next.run(request).await;
    }
    match presented(&request) {
        Some(given) if same(&given, token) => next.run(request).await,
        _ => refuse(
            StatusCode::UNAUTHORIZED,
            &path,
            "the dashboard needs its token: Authorization: Bearer <token>, or sign in at /login",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_tokens_compare_as_meant() {
        assert_eq!(host_name("127.0.0.1:7080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:7080"), "::1");
        assert_eq!(host_name("evil.example"), "evil.example");
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("abc", "ab"));
    }
}
