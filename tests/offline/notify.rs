//! The shipped email notification target (`config/notify/email.sh`), run the way keyrotd runs a
//! command target: a cleared environment with the notice's variables, the notice as JSON on stdin. A
//! stand-in `sendmail` keeps the message it is given.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use chrono::{TimeZone, Utc};
use keyrotd::notify::targets::{Notice, NoticeEvent};
use keyrotd::telemetry::Outcome;

use crate::sample::config;

#[test]
fn the_email_script_mails_the_line_and_the_notice_to_its_recipient() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mail = dir.path().join("mail.txt");
    let sendmail = dir.path().join("sendmail");
    std::fs::write(
        &sendmail,
        format!(
            "#!/bin/sh\necho \"$@\" > {0}.args\ncat > {0}\n",
            mail.display()
        ),
    )
    .expect("write sendmail");
    let mut perms = std::fs::metadata(&sendmail).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&sendmail, perms).expect("chmod");

    let key = config().keys.remove(0);
    let at = Utc.with_ymd_and_hms(2030, 1, 7, 3, 0, 0).unwrap();
    let mut notice = Notice::new(NoticeEvent::Failed, &key, at);
    notice.outcome = Some(Outcome::Failed);
    notice.reason = Some("regenerate refused, the old key still works: HTTP 403".into());
    let notice = notice.finish();
    let json = serde_json::to_string(&notice).expect("JSON");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/notify/email.sh");
    let mut child = Command::new(&script)
        .arg("payments-oncall@example.com")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SENDMAIL", &sendmail)
        .env("KEYROTD_EVENT", "failed")
        .env("KEYROTD_KEY", "billing")
        .env("KEYROTD_TEXT", &notice.text)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run config/notify/email.sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(json.as_bytes())
        .expect("write the notice");
    assert!(child.wait().expect("wait").success());

    let message = std::fs::read_to_string(&mail).expect("sendmail got a message");
    assert!(
        message.starts_with("To: payments-oncall@example.com\n"),
        "{message}"
    );
    assert!(
        message.contains("Subject: [keyrotd] failed: billing\n"),
        "{message}"
    );
    assert!(
        message.contains("keyrotd: rotation of billing failed: regenerate refused"),
        "{message}"
    );
    let sent = message
        .lines()
        .skip_while(|l| !l.starts_with("The notice as keyrotd sent it:"))
        .nth(1)
        .expect("the notice follows");
    let back: Notice = serde_json::from_str(sent).expect("the notice is intact");
    assert_eq!(back, notice);
    let args = std::fs::read_to_string(dir.path().join("mail.txt.args")).expect("args");
    assert_eq!(args.trim(), "-t -oi");
}
