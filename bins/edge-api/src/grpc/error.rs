//! gRPC status codes for every error the RPCs meet. Internal details (Redis addresses, script
//! replies) are logged here and never sent: the client gets UNAVAILABLE and a plain sentence.

use fleet::council::CouncilError;
use fleet::deliberation::engine::EngineError;
use fleet::deliberation::store::StoreError;
use fleet::session::{ChatError, TokenError};
use tonic::Status;

/// UNAVAILABLE for a storage failure; the detail is logged.
pub fn unavailable(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "rpc failed on an internal error");
    Status::unavailable("storage is temporarily unavailable; retry later")
}

/// The status of a chat error (the same classes REST answers with 400 / 404 / 409 / 429 / 503).
pub fn chat(e: ChatError) -> Status {
    match e {
        ChatError::Invalid(m) => Status::invalid_argument(m),
        e @ ChatError::NotFound { .. } => Status::not_found(e.to_string()),
        e @ ChatError::SessionClosed(_) => Status::failed_precondition(e.to_string()),
        e @ ChatError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        ChatError::Unavailable(detail) => unavailable(detail),
    }
}

/// The status of a session-token problem.
pub fn token(e: TokenError) -> Status {
    match e {
        TokenError::WrongSession => Status::permission_denied(e.to_string()),
        TokenError::Malformed | TokenError::BadSignature | TokenError::Expired => {
            Status::unauthenticated(e.to_string())
        }
    }
}

pub fn council(e: CouncilError) -> Status {
    match e {
        CouncilError::Invalid(m) => Status::invalid_argument(m),
        e @ CouncilError::Exists(_) => Status::already_exists(e.to_string()),
        CouncilError::Redis(e) => unavailable(e),
    }
}

pub fn engine(e: EngineError) -> Status {
    match e {
        EngineError::Council(c) => council(c),
        e @ EngineError::SpecConflict { .. } => Status::already_exists(e.to_string()),
        other => unavailable(other),
    }
}

pub fn store(e: StoreError) -> Status {
    unavailable(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_meaningful_codes_without_internals() {
        assert_eq!(
            chat(ChatError::Invalid("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            chat(ChatError::NotFound {
                what: "task",
                id: "t".into()
            })
            .code(),
            Code::NotFound
        );
        assert_eq!(
            chat(ChatError::SessionClosed("s".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            chat(ChatError::Overloaded { backlog: 3 }).code(),
            Code::ResourceExhausted
        );
        let s = chat(ChatError::Unavailable("redis at 10.0.0.3 refused".into()));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("10.0.0.3"));
        assert_eq!(
            token(TokenError::WrongSession).code(),
            Code::PermissionDenied
        );
        assert_eq!(token(TokenError::Expired).code(), Code::Unauthenticated);
        assert_eq!(
            council(CouncilError::Exists("DEV".into())).code(),
            Code::AlreadyExists
        );
        let s = engine(EngineError::SpecConflict {
            id: "auth-42".into(),
            status: fleet::deliberation::Status::Generating,
        });
        assert_eq!(s.code(), Code::AlreadyExists);
        assert!(s.message().contains("`auth-42`"), "{}", s.message());
        assert!(s.message().contains("spec differs"), "{}", s.message());
    }
}
