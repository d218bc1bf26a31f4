//! Echo mode: the message comes back word by word.

use std::time::Duration;

use fleet::envelope::ExecRequest;

use crate::executor::{Emitter, Ending, StopWhen};

/// Splits `message` into words that keep their trailing whitespace, so the chunks concatenate
/// to the message.
pub fn words(message: &str) -> Vec<&str> {
    message.split_inclusive(char::is_whitespace).collect()
}

pub async fn run(
    req: &ExecRequest,
    delay: Duration,
    emit: &mut Emitter<'_>,
    stop: &StopWhen,
) -> anyhow::Result<Ending> {
    for word in words(&req.message) {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait() => return Ok(Ending::Stopped),
            }
        }
        emit.chunk(word).await?;
    }
    Ok(Ending::Result(req.message.clone()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn words_concatenate_to_the_message() {
        let m = "hello  big\nworld ";
        let w = super::words(m);
        assert_eq!(w.concat(), m);
        assert_eq!(w[0], "hello ");
    }
}
