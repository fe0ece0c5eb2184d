//! A coarse per-worker timer for the timeouts every request arms and almost never reaches: the
//! response timeout and hyper's header read timeout.
//!
//! tokio's timer is exact, but arming and disarming one takes the time driver's lock and walks
//! its wheel, twice per request here. A worker thread instead keeps its armed timers as slots in
//! a thread-local table, and one task on that thread sweeps the table every `tick`: arming is a
//! slot and a waker clone, and a timeout fires at most one tick late. Threads without a sweeper
//! (anything but a router worker) get tokio's timer.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

struct Slot {
    deadline: Instant,
    waker: Option<Waker>,
    fired: bool,
}

struct Table {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    armed: usize,
    /// A sweeper task runs on this thread.
    installed: bool,
    /// The sweeper, parked while nothing is armed.
    idle_sweeper: Option<Waker>,
}

thread_local! {
    static TABLE: RefCell<Table> = const {
        RefCell::new(Table {
            slots: Vec::new(),
            free: Vec::new(),
            armed: 0,
            installed: false,
            idle_sweeper: None,
        })
    };
}

impl Table {
    fn arm(&mut self, deadline: Instant, waker: Waker) -> (usize, Option<Waker>) {
        let slot = Some(Slot {
            deadline,
            waker: Some(waker),
            fired: false,
        });
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.armed += 1;
        (i, self.idle_sweeper.take())
    }

    fn disarm(&mut self, i: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(i)?.take();
        if slot.is_some() {
            self.armed -= 1;
            self.free.push(i);
        }
        slot
    }
}

/// Runs this thread's sweeper until the runtime drops it; coarse timers made on this thread
/// from now on fire within `tick` of their deadline. Spawn it on a current-thread runtime (a
/// task that moved threads would sweep the wrong table).
pub async fn sweeper(tick: Duration) {
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            let _ = TABLE.try_with(|t| t.borrow_mut().installed = false);
        }
    }
    TABLE.with(|t| t.borrow_mut().installed = true);
    let _uninstall = Uninstall;
    loop {
        // Parked while nothing is armed, so an idle worker does not wake up every tick.
        std::future::poll_fn(|cx| {
            TABLE.with(|t| {
                let mut t = t.borrow_mut();
                if t.armed > 0 {
                    Poll::Ready(())
                } else {
                    t.idle_sweeper = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        let mut due = Vec::new();
        TABLE.with(|t| {
            for s in t.borrow_mut().slots.iter_mut().flatten() {
                if !s.fired && s.deadline <= now {
                    s.fired = true;
                    due.extend(s.waker.take());
                }
            }
        });
        // Woken outside the borrow: a waker may run code that arms another timer.
        due.into_iter().for_each(Waker::wake);
    }
}

/// A timer that completes at (or up to a tick after) its deadline.
pub struct Sleep(Inner);

enum Inner {
    Coarse {
        deadline: Instant,
        /// The table slot, once polled.
        slot: Option<usize>,
    },
    Exact(Pin<Box<tokio::time::Sleep>>),
}

impl Sleep {
    pub fn until(deadline: Instant) -> Sleep {
        let coarse = TABLE.try_with(|t| t.borrow().installed).unwrap_or(false);
        Sleep(if coarse {
            Inner::Coarse {
                deadline,
                slot: None,
            }
        } else {
            Inner::Exact(Box::pin(tokio::time::sleep_until(deadline.into())))
        })
    }

    pub fn reset(&mut self, new_deadline: Instant) {
        match &mut self.0 {
            Inner::Coarse { deadline, slot } => {
                *deadline = new_deadline;
                if let Some(i) = *slot {
                    TABLE.with(|t| {
                        if let Some(Some(s)) = t.borrow_mut().slots.get_mut(i) {
                            s.deadline = new_deadline;
                            s.fired = false;
                        }
                    });
                }
            }
            Inner::Exact(s) => s.as_mut().reset(new_deadline.into()),
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let (deadline, slot) = match &mut self.get_mut().0 {
            Inner::Exact(s) => return s.as_mut().poll(cx),
            Inner::Coarse { deadline, slot } => (*deadline, slot),
        };
        let wake_sweeper = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            match *slot {
                Some(i) => {
                    let s = t.slots[i].as_mut().expect("a polled timer keeps its slot");
                    if s.fired {
                        return Err(());
                    }
                    match &mut s.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => *w = Some(cx.waker().clone()),
                    }
                    Ok(None)
                }
                None => {
                    let (i, sweeper) = t.arm(deadline, cx.waker().clone());
                    *slot = Some(i);
                    Ok(sweeper)
                }
            }
        });
        match wake_sweeper {
            Err(()) => Poll::Ready(()),
            Ok(sweeper) => {
                if let Some(w) = sweeper {
                    w.wake();
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Inner::Coarse { slot: Some(i), .. } = self.0 {
            // The slot's waker is dropped after the borrow ends.
            let _slot = TABLE.try_with(|t| t.borrow_mut().disarm(i));
        }
    }
}

impl hyper::rt::Sleep for Sleep {}

/// `fut`'s output, or `None` if `deadline` passes first.
pub async fn timeout_at<F: Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    let Some(deadline) = deadline else {
        return Some(fut.await);
    };
    let mut fut = std::pin::pin!(fut);
    let mut sleep = Sleep::until(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| None)
    })
    .await
}

/// hyper's timer (the HTTP/1 header read timeout) on this module's timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let now = Instant::now();
        // Past what an Instant holds: thirty years is as good as never.
        let deadline = now
            .checked_add(duration)
            .unwrap_or(now + Duration::from_secs(30 * 365 * 86_400));
        self.sleep_until(deadline)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Sleep>() {
            Some(s) => s.get_mut().reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn coarse_timeouts_fire_within_a_tick_and_free_their_slots() {
        worker_runtime().block_on(async {
            tokio::spawn(sweeper(Duration::from_millis(5)));
            tokio::task::yield_now().await;
            let started = Instant::now();
            let deadline = Some(started + Duration::from_millis(30));
            assert!(matches!(Sleep::until(started).0, Inner::Coarse { .. }));
            let late = timeout_at(deadline, std::future::pending::<()>()).await;
            let waited = started.elapsed();
            assert_eq!(late, None);
            assert!(waited >= Duration::from_millis(30), "{waited:?}");
            assert!(waited < Duration::from_millis(500), "{waited:?}");
            assert_eq!(timeout_at(deadline, async { 7 }).await, Some(7));
            assert_eq!(timeout_at(None, async { 8 }).await, Some(8));
            // A reset timer waits for its new deadline.
            let mut s = Sleep::until(Instant::now());
            s.reset(Instant::now() + Duration::from_millis(20));
            let t = Instant::now();
            (&mut s).await;
            assert!(t.elapsed() >= Duration::from_millis(20));
            drop(s);
            TABLE.with(|t| assert_eq!(t.borrow().armed, 0));
        });
    }

    #[test]
    fn threads_without_a_sweeper_use_tokio_timers() {
        worker_runtime().block_on(async {
            let s = Sleep::until(Instant::now() + Duration::from_millis(10));
            assert!(matches!(s.0, Inner::Exact(_)));
            s.await;
        });
    }
}
