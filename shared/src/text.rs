//! Text that every task writes (key names, stream ids, timestamps), built without `format!`:
//! the formatting machinery costs hundreds of instructions a call.

/// `parts` joined, in one allocation of the right size.
pub fn concat(parts: &[&str]) -> String {
    concat_after("", parts)
}

/// `first` followed by `parts`, in one allocation of the right size.
pub fn concat_after(first: &str, parts: &[&str]) -> String {
    let mut out = String::with_capacity(first.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    out.push_str(first);
    for part in parts {
        out.push_str(part);
    }
    out
}

/// Room for any `u64` in decimal.
pub type DigitBuf = [u8; 20];

/// `n` in decimal, written at the end of `buf`.
pub fn decimal(n: u64, buf: &mut DigitBuf) -> &str {
    let mut at = buf.len();
    let mut v = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).expect("ASCII digits")
}

/// Appends `n` in decimal with at least `width` digits (zeros in front), as `{n:0width$}` does.
pub fn push_padded(out: &mut String, n: i64, width: usize) {
    if n < 0 {
        out.push('-');
    }
    let mut buf = DigitBuf::default();
    let digits = decimal(n.unsigned_abs(), &mut buf);
    for _ in (digits.len() + usize::from(n < 0))..width {
        out.push('0');
    }
    out.push_str(digits);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_joined_in_order() {
        assert_eq!(concat(&["s", "/", "t"]), "s/t");
        assert_eq!(concat_after("p", &[":a", ":b"]), "p:a:b");
        assert_eq!(concat(&[]), "");
    }

    proptest::proptest! {
        #[test]
        fn writes_what_format_writes(n: u64, m: i64, width in 0usize..24) {
            let mut buf = DigitBuf::default();
            proptest::prop_assert_eq!(decimal(n, &mut buf), n.to_string());
            let mut out = String::new();
            push_padded(&mut out, m, width);
            proptest::prop_assert_eq!(out, format!("{m:0width$}"));
        }
    }
}
