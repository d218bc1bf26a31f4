//! `RegisterAgent`, `UnregisterAgent`, `CreateCouncil`, `ListCouncils`, `DeleteCouncil`: the
//! council registry of [`fleet::council`].

use fleet::council::{CouncilDef, Registration};
use fleet::time::now_ms;
use fleet_proto::orchestrator::v1 as pb;
use tonic::{Request, Status};
use tracing::Span;

use super::{Orchestrator, convert, error};

fn role_of(r: &str) -> Result<&'static str, Status> {
    fleet::deliberation::parse_role(r).ok_or_else(|| {
        Status::invalid_argument(format!(
            "role `{}` is not one of {}",
            r.chars().take(32).collect::<String>(),
            fleet::deliberation::ROLES.join(", ")
        ))
    })
}

impl Orchestrator {
    #[tracing::instrument(skip_all, fields(agent_id))]
    pub async fn register_agent_rpc(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<pb::RegisterAgentResponse, Status> {
        let req = req.into_inner();
        Span::current().record("agent_id", req.agent_id.as_str());
        let (record, created) = self
            .engine
            .councils
            .register(&Registration {
                agent_id: req.agent_id,
                role: req.role,
                capabilities: req.capabilities,
                metadata: req.metadata.into_iter().collect(),
                heartbeat_ms: i64::from(req.heartbeat_ms),
                status: req.status,
            })
            .await
            .map_err(error::council)?;
        if created {
            tracing::info!(role = %record.role, "agent registered");
        }
        Ok(pb::RegisterAgentResponse {
            agent: Some(convert::agent(&record)),
            created,
        })
    }

    #[tracing::instrument(skip_all, fields(agent_id))]
    pub async fn unregister_agent_rpc(
        &self,
        req: Request<pb::UnregisterAgentRequest>,
    ) -> Result<pb::UnregisterAgentResponse, Status> {
        let id = req.into_inner().agent_id;
        Span::current().record("agent_id", id.as_str());
        let not_found = || {
            Status::not_found(format!(
                "agent `{}` is not registered",
                id.chars().take(128).collect::<String>()
            ))
        };
        if !fleet::agent::valid_name(&id) {
            return Err(not_found());
        }
        if !self
            .engine
            .councils
            .unregister(&id)
            .await
            .map_err(error::council)?
        {
            return Err(not_found());
        }
        Ok(pb::UnregisterAgentResponse { removed: true })
    }

    #[tracing::instrument(skip_all, fields(role))]
    pub async fn create_council_rpc(
        &self,
        req: Request<pb::CreateCouncilRequest>,
    ) -> Result<pb::CreateCouncilResponse, Status> {
        let req = req.into_inner();
        let role = role_of(&req.role)?;
        Span::current().record("role", role);
        let num_agents = u32::try_from(req.num_agents)
            .map_err(|_| Status::invalid_argument("num_agents must not be negative"))?;
        self.engine
            .councils
            .create(&CouncilDef {
                role: role.to_owned(),
                num_agents,
                agent_type: req.agent_type,
                config: req.config.into_iter().collect(),
                created_ms: now_ms(),
            })
            .await
            .map_err(error::council)?;
        let view = self
            .engine
            .councils
            .list()
            .await
            .map_err(error::council)?
            .into_iter()
            .find(|c| c.role == role)
            .ok_or_else(|| Status::unavailable("the council vanished; retry"))?;
        Ok(pb::CreateCouncilResponse {
            council: Some(convert::council(&view, true)),
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn list_councils_rpc(
        &self,
        req: Request<pb::ListCouncilsRequest>,
    ) -> Result<pb::ListCouncilsResponse, Status> {
        let include = req.into_inner().include_agents;
        let councils = self.engine.councils.list().await.map_err(error::council)?;
        Ok(pb::ListCouncilsResponse {
            councils: councils
                .iter()
                .map(|c| convert::council(c, include))
                .collect(),
        })
    }

    #[tracing::instrument(skip_all, fields(role))]
    pub async fn delete_council_rpc(
        &self,
        req: Request<pb::DeleteCouncilRequest>,
    ) -> Result<pb::DeleteCouncilResponse, Status> {
        let role = role_of(&req.into_inner().role)?;
        Span::current().record("role", role);
        let (deleted, removed) = self
            .engine
            .councils
            .delete(role)
            .await
            .map_err(error::council)?;
        if !deleted && removed == 0 {
            return Err(Status::not_found(format!("no council for role {role}")));
        }
        Ok(pb::DeleteCouncilResponse {
            deleted,
            agents_removed: removed as i32,
        })
    }
}
