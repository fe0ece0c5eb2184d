//! Graceful shutdown of one worker's client connections.
//!
//! hyper-util's `GracefulShutdown` polls a watch-channel future (re-registering its waiter)
//! on every poll of every connection, twice per proxied request. Here a connection registers
//! its task's waker once, and each poll after that only loads a flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use tokio::sync::Notify;

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// Connections started and not yet dropped (including TLS handshakes).
    live: AtomicUsize,
    idle: Notify,
    /// The wakers of registered connections; `None` marks a free slot.
    wakers: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// One worker's drain signal.
#[derive(Clone, Default)]
pub struct Drain(Arc<Shared>);

impl Drain {
    /// Counts a new connection until the returned guard drops.
    pub fn enter(&self) -> Guard {
        self.0.live.fetch_add(1, Ordering::Relaxed);
        Guard {
            drain: self.0.clone(),
            slot: None,
            waker: None,
        }
    }

    /// Tells every connection to finish its current exchange and close, then waits until all
    /// have.
    pub async fn shutdown(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut self.0.wakers.lock().expect("drain slots").wakers);
        wakers.into_iter().flatten().for_each(Waker::wake);
        // notify_one keeps a permit, so the last connection leaving between the check and the
        // wait is not missed.
        while self.0.live.load(Ordering::SeqCst) > 0 {
            self.0.idle.notified().await;
        }
    }
}

/// A live connection's place in its worker's drain.
pub struct Guard {
    drain: Arc<Shared>,
    slot: Option<usize>,
    /// The waker registered in `slot`, to notice a change without taking the lock.
    waker: Option<Waker>,
}

impl Guard {
    /// True once the worker drains; registers nothing.
    pub fn is_draining(&self) -> bool {
        self.drain.draining.load(Ordering::Relaxed)
    }

    /// Ready once the worker drains; until then `cx`'s task hears of it.
    pub fn poll_draining(&mut self, cx: &Context<'_>) -> std::task::Poll<()> {
        if self.draining(cx) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// True once the worker drains. Until then makes sure `cx`'s waker hears of it.
    fn draining(&mut self, cx: &Context<'_>) -> bool {
        if self.drain.draining.load(Ordering::Relaxed) {
            return true;
        }
        if matches!(&self.waker, Some(w) if w.will_wake(cx.waker())) {
            return false;
        }
        let mut slots = self.drain.wakers.lock().expect("drain slots");
        // Checked under the lock: shutdown sets the flag before it takes the wakers, so either
        // this sees the flag or shutdown sees this waker.
        if self.drain.draining.load(Ordering::SeqCst) {
            return true;
        }
        let waker = Some(cx.waker().clone());
        match self.slot {
            Some(i) => slots.wakers[i] = waker.clone(),
            None => {
                let i = match slots.free.pop() {
                    Some(i) => {
                        slots.wakers[i] = waker.clone();
                        i
                    }
                    None => {
                        slots.wakers.push(waker.clone());
                        slots.wakers.len() - 1
                    }
                };
                self.slot = Some(i);
            }
        }
        self.waker = waker;
        false
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if let Ok(mut slots) = self.drain.wakers.lock() {
                // After shutdown took the wakers the slot no longer exists.
                if let Some(w) = slots.wakers.get_mut(i) {
                    *w = None;
                    slots.free.push(i);
                }
            }
        }
        if self.drain.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drain.idle.notify_one();
        }
    }
}

/// Serves `conn` until it ends; when the worker drains, or `idle` resolves (the connection
/// has been idle too long), asks it to finish through `shutdown` (its `graceful_shutdown`).
pub async fn watch<C: Future>(
    conn: C,
    mut guard: Guard,
    idle: impl Future<Output = ()>,
    shutdown: impl Fn(Pin<&mut C>),
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    let mut idle = std::pin::pin!(idle);
    let mut asked = false;
    std::future::poll_fn(|cx| {
        if !asked && (guard.draining(cx) || idle.as_mut().poll(cx).is_ready()) {
            asked = true;
            shutdown(conn.as_mut());
        }
        conn.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use std::time::Duration;

    /// A connection that runs until asked to shut down.
    struct Conn {
        asked: bool,
    }

    impl Future for Conn {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.asked {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn shutdown_asks_every_connection_and_waits_for_them() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let drain = Drain::default();
            for _ in 0..3 {
                let guard = drain.enter();
                tokio::spawn(watch(
                    Conn { asked: false },
                    guard,
                    std::future::pending(),
                    |mut c| c.asked = true,
                ));
            }
            // One that ends on its own, and one still handshaking (a bare guard).
            tokio::spawn(watch(
                Conn { asked: true },
                drain.enter(),
                std::future::pending(),
                |_| (),
            ));
            let handshaking = drain.enter();
            tokio::task::yield_now().await;
            assert_eq!(drain.0.live.load(Ordering::SeqCst), 4);
            let release = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(handshaking);
            };
            let (done, ()) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(5), drain.shutdown()),
                release
            );
            assert!(done.is_ok(), "shutdown did not finish");
            assert_eq!(drain.0.live.load(Ordering::SeqCst), 0);
            // A connection that starts after shutdown began is asked at once.
            let late = tokio::spawn(watch(
                Conn { asked: false },
                drain.enter(),
                std::future::pending(),
                |mut c| c.asked = true,
            ));
            tokio::time::timeout(Duration::from_secs(5), late)
                .await
                .expect("late connection ended")
                .unwrap();
        });
    }
}
