//! Helpers for AWS SDK errors: full display (the SDK's `Display` only says "service
//! error") and the transient/permanent split, decided from the typed error, never from
//! its text.

use aws_sdk_dynamodb::error::SdkError;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Renders an error with its whole source chain.
pub fn display<E: std::error::Error>(e: &E) -> String {
    DisplayErrorContext(e).to_string()
}

/// Error codes AWS services use for throttling and passing trouble.
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    "KMSThrottlingException",
];

/// Whether the service refused the request itself as invalid (`ValidationException`:
/// an item over 400 KB, a number out of range, a malformed expression). Sending the same
/// request again fails the same way, so it is never retried.
pub fn is_invalid_request<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.as_service_error()
        .and_then(|se| se.code())
        .is_some_and(|c| c == "ValidationException")
}

/// Whether retrying the same call later could succeed: timeouts, connection failures,
/// throttling and 5xx answers.
pub fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ResponseError(_) => true,
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            status >= 500
                || status == 429
                || se
                    .err()
                    .code()
                    .is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
        _ => false,
    }
}
