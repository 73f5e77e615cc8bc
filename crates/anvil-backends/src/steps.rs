//! Per-step timings of a multi-step operation (a VM launch, a sandbox start), logged with
//! the operation's "ready" line so an operator can see where the time of a slow start went.

use std::fmt;
use std::time::Instant;

/// Records the time since the previous mark under a step name.
pub struct Steps {
    last: Instant,
    done: Vec<(&'static str, u32)>,
}

impl Steps {
    pub fn start() -> Self {
        Steps {
            last: Instant::now(),
            done: Vec::with_capacity(8),
        }
    }

    /// Ends the current step, naming it.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let us = now.duration_since(self.last).as_micros();
        self.done
            .push((name, u32::try_from(us).unwrap_or(u32::MAX)));
        self.last = now;
    }
}

/// `name=1.23ms name=0.40ms …`
impl fmt::Display for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, us)) in self.done.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={}.{:02}ms", us / 1000, (us % 1000) / 10)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_steps_in_order() {
        let mut s = Steps::start();
        s.done.push(("a", 1234));
        s.done.push(("b", 5));
        assert_eq!(s.to_string(), "a=1.23ms b=0.00ms");
        s.mark("c");
        assert!(s.to_string().starts_with("a=1.23ms b=0.00ms c="));
    }
}
