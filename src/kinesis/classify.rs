//! Classification of Kinesis and AWS SDK errors into the worker's failure classes.

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
        | "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => ErrorClass::Configuration,
        "ValidationException" | "InvalidArgumentException" | "SerializationException" => {
            ErrorClass::Invalid
        }
        _ => ErrorClass::Transient,
    }
}

/// Classifies an SDK error of any operation.
pub fn classify_sdk_error<E, R>(error: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let local = |code: &str, class: ErrorClass| Failure {
        class,
        code: code.to_owned(),
        message: aws_smithy_types::error::display::DisplayErrorContext(error).to_string(),
    };
    match error {
        SdkError::TimeoutError(_) => local("timeout", ErrorClass::Transient),
        SdkError::DispatchFailure(failure) => {
            if failure.is_user() {
                local("dispatch", ErrorClass::Configuration)
            } else {
                local("dispatch", ErrorClass::Transient)
            }
        }
        SdkError::ResponseError(_) => local("response", ErrorClass::Transient),
        SdkError::ConstructionFailure(_) => local("construction", ErrorClass::Configuration),
        SdkError::ServiceError(context) => {
            let err = context.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or_default().to_owned();
            let class = match err.code() {
                Some(code) => classify_code(code),
                None => ErrorClass::Transient,
            };
            Failure {
                class,
                code,
                message,
            }
        }
        _ => local("unknown", ErrorClass::Transient),
    }
}
