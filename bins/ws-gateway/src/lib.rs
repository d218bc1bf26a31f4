//! ws-gateway: WebSocket and SSE gateway: replays session logs and delivers live events.
