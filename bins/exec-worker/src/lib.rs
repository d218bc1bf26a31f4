//! exec-worker: Reference executor: runs tasks from fleet:exec:<pool> (echo, command).
