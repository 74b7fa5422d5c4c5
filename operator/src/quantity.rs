//! Reads Kubernetes quantities (`500m`, `2`, `8Gi`, `1.5e3`, `128974848`) as
//! numbers, to compare a request with a limit before the API server does.
//! Written by hand: k8s-openapi's `Quantity` is a string, and the crates
//! that parse it pull in more than this needs (an `f64` is exact enough to
//! order two amounts).

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The amount `q` stands for, in base units (cores, bytes), or `None` when
/// it is not a Kubernetes quantity.
#[must_use]
pub fn value(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// Whether `a` is more than `b` (false when either does not parse: the
/// API server reports those).
#[must_use]
pub fn exceeds(a: &Quantity, b: &Quantity) -> bool {
    matches!((value(a), value(b)), (Some(a), Some(b)) if a > b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<f64> {
        value(&Quantity(s.to_owned()))
    }

    #[test]
    fn reads_the_suffixes_kubernetes_writes() {
        assert_eq!(v("2"), Some(2.0));
        assert_eq!(v("500m"), Some(0.5));
        assert_eq!(v("0.5"), Some(0.5));
        assert_eq!(v("8Gi"), Some(8.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(v("129M"), Some(129e6));
        assert_eq!(v("1.5e3"), Some(1500.0));
        assert_eq!(v("12E"), Some(12e18), "E alone is exa, not an exponent");
        assert_eq!(v("abc"), None);
        assert_eq!(v("1.2.3"), None);
        assert_eq!(v("3Qi"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn compares_across_units() {
        let q = |s: &str| Quantity(s.to_owned());
        assert!(exceeds(&q("32Gi"), &q("16Gi")));
        assert!(exceeds(&q("17G"), &q("15Gi")));
        assert!(!exceeds(&q("1"), &q("1000m")));
        assert!(exceeds(&q("2"), &q("1500m")));
        assert!(!exceeds(&q("nonsense"), &q("1")));
    }
}
