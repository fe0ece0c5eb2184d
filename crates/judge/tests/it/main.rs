//! The judges' integration tests in one test binary (`cargo test -p coalmine-judge --test it kayenta::` runs one module).

mod common;

mod counts;
mod kayenta;
mod paired;
mod quantiles;
