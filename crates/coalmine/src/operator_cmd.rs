//! `coalmine crd`: Coalmine's custom resource definitions, as `kubectl apply -f -` takes them.

use std::process::ExitCode;

use clap::Args;

use crate::rollout_cmd::OutputFormat;

#[derive(Args)]
pub struct CrdArgs {
    /// `text`: a YAML stream; `json`: one `v1` `List`
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn crd(args: CrdArgs) -> anyhow::Result<ExitCode> {
    let text = match args.output {
        OutputFormat::Text => coalmine_operator::crd::crds_yaml(),
        OutputFormat::Json => {
            let list = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": coalmine_operator::crd::crds(),
            });
            format!("{}\n", serde_json::to_string_pretty(&list)?)
        }
    };
    crate::output::text(&text);
    Ok(ExitCode::SUCCESS)
}
