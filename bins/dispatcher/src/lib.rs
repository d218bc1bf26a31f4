//! dispatcher: Consumes fleet:tasks and dispatches work to executors.
