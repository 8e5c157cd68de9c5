//! Classification of Kinesis and AWS SDK errors into the worker's failure classes.
//!
//! The rule the worker builds on: only what the service says about a record counts toward
//! `max attempts`. Failures that are not the job's fault — no answer at all, a whole request
//! failed by the service (5xx), missing or refused credentials, a refused assume-role, a stream
//! that does not exist — are [`ErrorClass::Unavailable`] or [`ErrorClass::Configuration`]: they
//! are retried for as long as they last and never make a job dead.

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

use crate::delivery::{ErrorClass, Failure};

/// Classifies a Kinesis error code (request-level or per record).
pub fn classify_code(code: &str) -> ErrorClass {
    match code {
        "ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "ThrottlingException"
        | "Throttling"
        | "LimitExceededException"
        | "RequestLimitExceeded"
        | "SlowDown" => ErrorClass::Throttled,
        "ResourceNotFoundException"
        | "AccessDeniedException"
        | "AccessDenied"
        | "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "IncompleteSignature"
        | "InvalidClientTokenId"
        | "MissingAuthenticationToken" => ErrorClass::Configuration,
        "ValidationException" | "InvalidArgumentException" | "SerializationException" => {
            ErrorClass::Invalid
        }
        _ => ErrorClass::Transient,
    }
}

/// What an operator does about a failure that is not the job's fault, by its code.
pub fn advice(code: &str) -> Option<&'static str> {
    Some(match code {
        "credentials" => {
            "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a web identity token, or run where the instance or container metadata endpoint answers; with JOURNALED_IAM_ROLE_ARN, check that the role exists and trusts the worker's identity (sts:AssumeRole)"
        }
        "ResourceNotFoundException" => {
            "the stream does not exist: create it, or fix JOURNALED_STREAM_NAME or the event's stream"
        }
        "AccessDeniedException"
        | "AccessDenied"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "IncompleteSignature"
        | "InvalidClientTokenId"
        | "MissingAuthenticationToken" => {
            "the credentials are refused or lack permission: grant kinesis:PutRecords on the stream to the worker's identity (or JOURNALED_IAM_ROLE_ARN), and check the region and the clock"
        }
        "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired" => {
            "the stream's KMS key is missing, disabled or not usable by the worker: enable it and grant kms:GenerateDataKey to the worker's identity"
        }
        "dispatch" | "timeout" | "response" | "unavailable" => {
            "Kinesis did not answer or failed the whole request: check the endpoint (AWS_ENDPOINT_URL_KINESIS), the region, the network and the AWS Health Dashboard"
        }
        _ => return None,
    })
}

/// `message`, followed by the advice for `code` when there is one.
pub(crate) fn advised(code: &str, message: String) -> String {
    match advice(code) {
        Some(advice) if message.is_empty() => advice.to_owned(),
        Some(advice) => format!("{message} — {advice}"),
        None => message,
    }
}

/// The first error of type `T` in `error`'s source chain.
fn find_in_chain<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Classifies an SDK error of any operation.
pub fn classify_sdk_error<E>(error: &SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let local = |code: &str, class: ErrorClass| Failure {
        class,
        code: code.to_owned(),
        message: advised(
            code,
            aws_smithy_types::error::display::DisplayErrorContext(error).to_string(),
        ),
    };
    // A credentials provider that fails (nothing found, metadata endpoint unreachable, an STS
    // assume-role refused) surfaces as a dispatch or construction failure: find it in the chain.
    if find_in_chain::<CredentialsError>(error).is_some() {
        return local("credentials", ErrorClass::Configuration);
    }
    match error {
        SdkError::TimeoutError(_) => local("timeout", ErrorClass::Unavailable),
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            local("dispatch", ErrorClass::Configuration)
        }
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            local("timeout", ErrorClass::Unavailable)
        }
        SdkError::DispatchFailure(_) => local("dispatch", ErrorClass::Unavailable),
        SdkError::ResponseError(_) => local("response", ErrorClass::Unavailable),
        SdkError::ConstructionFailure(_) => local("construction", ErrorClass::Configuration),
        SdkError::ServiceError(context) => {
            let err = context.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or_default().to_owned();
            let class = match err.code() {
                Some(code) => classify_code(code),
                None => ErrorClass::Transient,
            };
            // A request failed as a whole by the service (5xx) is no record's fault.
            let server_error = context.raw().status().is_server_error();
            let class = match class {
                ErrorClass::Transient if server_error || code == "InternalFailure" => {
                    ErrorClass::Unavailable
                }
                class => class,
            };
            Failure {
                class,
                message: advised(&code, message),
                code,
            }
        }
        _ => local("unknown", ErrorClass::Unavailable),
    }
}
