//! Every error the API answers, as one type: [`ApiError`] becomes a JSON body
//! `{"error": "...", "code": "..."}` with its status (and `Retry-After` for 429/503,
//! `WWW-Authenticate` for 401). [`recover`] is the one place where warp rejections (unknown
//! route, wrong method, bad query, ...) and our own errors are turned into responses.
//!
//! Messages are written for the operator and never contain a token or a file path from the
//! agent's host; internal details are logged, not answered.
use std::{convert::Infallible, time::Duration};

use warp::{
    http::{header, HeaderValue, StatusCode},
    reject::Reject,
    reply::Response,
    Rejection, Reply,
};

use crate::{agent::AttachRefused, store::StoreError};

/// An error answered to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_token`, `rate_limited`.
    pub code: &'static str,
    /// One line for a human.
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    pub retry_after: Option<Duration>,
}

impl Reject for ApiError {}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    pub fn with_retry_after(mut self, after: Duration) -> ApiError {
        self.retry_after = Some(after);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn too_large(limit: u64) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body larger than {limit} bytes"),
        )
    }

    pub fn rate_limited(scope: &str, after: Duration) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("too many requests ({scope}); retry later"))
            .with_retry_after(after)
    }

    /// 503 at once when the cap on concurrent expensive work is reached.
    pub fn busy() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many snapshots or renders in progress; retry later",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    pub fn timeout(after: Duration) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {}s; retry later", after.as_secs()),
        )
        .with_retry_after(Duration::from_secs(5))
    }

    pub fn internal(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }

    /// The JSON body alone.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message, "code": self.code })
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let mut resp = warp::reply::with_status(warp::reply::json(&self.body()), self.status).into_response();
        let headers = resp.headers_mut();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"memscope\""));
        }
        resp
    }
}

impl From<AttachRefused> for ApiError {
    fn from(e: AttachRefused) -> ApiError {
        match e {
            AttachRefused::AlreadyAttached(_) => ApiError::conflict("already_attached", e.to_string()),
            AttachRefused::TooManyTargets(_) => ApiError::conflict("too_many_targets", e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::InvalidId => ApiError::bad_request("invalid_snapshot_id", e.to_string()),
            StoreError::NotFound(_) => ApiError::not_found("snapshot_not_found", e.to_string()),
            StoreError::InvalidReason(_) => ApiError::bad_request("invalid_reason", e.to_string()),
            StoreError::Io { .. } if e.is_full() => {
                tracing::error!(error = %e, "snapshot store: no space");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "storage_full",
                    "the data directory is full: the snapshot was not stored (earlier snapshots are kept); free space, or lower --retain-bytes",
                )
            }
            StoreError::Io { .. } if e.is_read_only() => {
                tracing::error!(error = %e, "snapshot store: not writable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_read_only",
                    "the data directory is not writable (read-only file system or permissions): nothing was stored or removed; earlier snapshots are still served",
                )
            }
            StoreError::Corrupt { ref id, .. } => {
                tracing::error!(error = %e, "snapshot store");
                ApiError::internal("snapshot_corrupt", format!("snapshot {id} is unreadable on disk and is not served"))
            }
            other => {
                tracing::error!(error = %other, "snapshot store");
                ApiError::internal("store_error", "the snapshot store failed; see the agent's log")
            }
        }
    }
}

/// Turns any rejection into a JSON error. Installed once, around all routes.
pub async fn recover(err: Rejection) -> Result<Response, Infallible> {
    Ok(rejection_to_error(&err).into_response())
}

pub(crate) fn rejection_to_error(err: &Rejection) -> ApiError {
    if let Some(e) = err.find::<ApiError>() {
        return e.clone();
    }
    if err.is_not_found() {
        return ApiError::not_found("not_found", "no such route");
    }
    if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route");
    }
    if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        return ApiError::too_large(super::limits::BODY_LIMIT_DEFAULT);
    }
    if err.find::<warp::reject::InvalidQuery>().is_some() {
        return ApiError::bad_request("bad_query", "invalid query string");
    }
    if err.find::<warp::reject::InvalidHeader>().is_some() || err.find::<warp::reject::MissingHeader>().is_some() {
        return ApiError::bad_request("bad_header", "invalid or missing header");
    }
    if err.find::<warp::reject::LengthRequired>().is_some() {
        return ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", "a Content-Length header is required");
    }
    if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        return ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "unsupported media type");
    }
    tracing::error!(rejection = ?err, "unhandled rejection");
    ApiError::internal("internal", "internal error")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 429 and 503 carry Retry-After in whole seconds (rounded up), 401 a Bearer challenge.
    #[test]
    fn headers_follow_status() {
        let r = ApiError::rate_limited("token", Duration::from_millis(1500)).into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = ApiError::unauthorized("missing_token", "no").into_response();
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
    }
}
