//! The offline commands: `verify` and `recover` a data dir with no broker running.

use super::{RecoverArgs, VerifyArgs};
use std::process::ExitCode;
use tapeline::Result;

pub fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let report = tapeline::store::verify(&args.data)?;
    println!(
        "verified {} commit records, {} streams, {} chunks, {} intact records: {} damaged ranges",
        report.commit_records,
        report.streams,
        report.chunks,
        report.records,
        report.damage.len() + report.log_damage.len()
    );
    for damage in &report.log_damage {
        println!("damaged: {damage}");
    }
    for damage in &report.damage {
        println!("damaged: {damage}");
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(super::exit::DAMAGE) })
}

pub async fn recover(args: RecoverArgs) -> Result<ExitCode> {
    let done = tapeline::store::recover(&args.data, &args.into).await?;
    println!(
        "recovered {} records of {} streams into {} ({}); {} damaged ranges skipped",
        done.records,
        done.streams,
        args.into.display(),
        if done.through_log {
            "found by scanning its files, with the streams' metadata from its log"
        } else {
            "found by scanning its files; its log could not be read, so streams get default metadata"
        },
        done.damage.len()
    );
    for damage in &done.damage {
        println!("skipped: {damage}");
    }
    Ok(ExitCode::SUCCESS)
}
