//! `/api/v1/agents/...`: create, replace, read, list and delete agent configs.
//!
//! Guarded by [`AdminKey`] when `FLEET_API_KEYS` is set. The stored shape is
//! [`fleet::agent::AgentConfig`]; the id comes from the path (an `id` in a PUT body is ignored).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use fleet::agent::{AgentConfig, excerpt, valid_name};
use serde::Serialize;
use tracing::Span;

use super::AppState;
use crate::auth::AdminKey;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("agent `{}` not found", excerpt(id)))
}

/// Puts the path's id on the request's span, quoted short as in error messages: the path is the
/// client's, of any length and holding anything percent-encoding can carry.
fn record_id(id: &str) {
    Span::current().record("agent_id", excerpt(id).as_str());
}

/// Creates (201) or replaces (200) an agent; answers with the stored config.
#[tracing::instrument(skip_all, fields(agent_id))]
pub async fn put(
    State(state): State<AppState>,
    _key: AdminKey,
    ApiPath(id): ApiPath<String>,
    ApiJson(mut agent): ApiJson<AgentConfig>,
) -> Result<(StatusCode, Json<AgentConfig>), ApiError> {
    record_id(&id);
    agent.id = id;
    let existed = state.chat.agents.put(&agent).await?;
    tracing::info!(pool = %agent.pool, replaced = existed, "agent stored");
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(agent)))
}

/// One agent: 200, or 404.
#[tracing::instrument(skip_all, fields(agent_id))]
pub async fn get(
    State(state): State<AppState>,
    _key: AdminKey,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AgentConfig>, ApiError> {
    record_id(&id);
    if !valid_name(&id) {
        return Err(not_found(&id));
    }
    match state.chat.agents.get(&id).await? {
        Some(agent) => Ok(Json(agent)),
        None => Err(not_found(&id)),
    }
}

/// Deletes an agent: 204, or 404.
#[tracing::instrument(skip_all, fields(agent_id))]
pub async fn delete(
    State(state): State<AppState>,
    _key: AdminKey,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    record_id(&id);
    if valid_name(&id) && state.chat.agents.delete(&id).await? {
        tracing::info!("agent deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&id))
    }
}

/// `GET /api/v1/agents` answer.
#[derive(Debug, Serialize)]
pub struct AgentList {
    pub agents: Vec<AgentConfig>,
}

/// Every agent, sorted by id.
#[tracing::instrument(skip_all)]
pub async fn list(
    State(state): State<AppState>,
    _key: AdminKey,
) -> Result<Json<AgentList>, ApiError> {
    Ok(Json(AgentList {
        agents: state.chat.agents.list().await?,
    }))
}
