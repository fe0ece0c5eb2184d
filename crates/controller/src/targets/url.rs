//! A version already serving at a URL: nothing to start, wait for or stop.

use std::future::ready;

use coalmine_spec::rollout::{HttpUrl, Target};

use super::{TargetError, TargetKind, Version};
use crate::BoxFuture;

pub struct Url;

struct Serving(HttpUrl);

impl TargetKind for Url {
    fn name(&self) -> &'static str {
        "url"
    }

    fn runs(&self, target: &Target) -> bool {
        matches!(target, Target::Url(_))
    }

    fn needs_keeper(&self) -> bool {
        false
    }

    fn start<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Box<dyn Version>, TargetError>> {
        Box::pin(ready(match target {
            Target::Url(url) => Ok(Box::new(Serving(url.clone())) as Box<dyn Version>),
            _ => Err(TargetError::Unknown),
        }))
    }
}

impl Version for Serving {
    fn url(&self) -> &HttpUrl {
        &self.0
    }

    fn runs(&self, target: &Target) -> bool {
        matches!(target, Target::Url(url) if *url == self.0)
    }

    fn ready(&mut self) -> BoxFuture<'_, Result<(), TargetError>> {
        Box::pin(ready(Ok(())))
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(ready(()))
    }
}
