//! Wall time per phase of a step (vision, perceiver, layers forward and
//! backward, head, optimizer, …), for profiling. On a GPU each mark waits
//! for the device first, so timing slows the step a little.

#[derive(Debug)]
pub(crate) struct PhaseTimer {
    device: tch::Device,
    last: std::time::Instant,
    pub(crate) totals: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    pub(crate) fn new(device: tch::Device) -> Self {
        Self {
            device,
            last: std::time::Instant::now(),
            totals: Vec::new(),
        }
    }

    /// Charges the time since the last mark to `phase`.
    pub(crate) fn mark(&mut self, phase: &'static str) {
        if let tch::Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        let now = std::time::Instant::now();
        let seconds = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        match self.totals.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += seconds,
            None => self.totals.push((phase, seconds)),
        }
    }
}

/// Marks `phase` on `timer` when timing is on.
pub(crate) fn mark(timer: &mut Option<PhaseTimer>, phase: &'static str) {
    if let Some(timer) = timer {
        timer.mark(phase);
    }
}
