//! A webhook's `metadata.cmd`, read without a shell: split into words with the shell's quoting
//! rules (and nothing else a shell does), then read as `hey`'s command line. Pure: no IO.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use reqwest::Url;

use coalmine_spec::parse_duration;

/// What Coalmine's loadtester can run, for error messages.
pub const SUPPORTED: &str = "hey's -z -n -c -q -m -H -d -t -A -T -U -a -host -h2 \
     -disable-keepalive -disable-compression -disable-redirects -cpus and the URL";

/// The `User-Agent` token, where hey sends `hey/0.0.1`.
pub const AGENT: &str = concat!("coalmine-loadtester/", env!("CARGO_PKG_VERSION"));

/// Splits `cmd` into words as `sh` would, refusing everything that would make `sh` do more than
/// run one program with literal arguments: separators, pipes, redirections, substitutions,
/// variables, subshells, comments. Globs (`*`, `?`, `[`) stay literal.
pub fn split_words(cmd: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word exists once it has a character or a quote (`''` is an empty word).
    let mut in_word = false;
    let mut chars = cmd.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, c)) => word.push(c),
                        None => return Err(format!("unterminated ' quote from column {}", at + 1)),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.peek().map(|&(_, c)| c) {
                            Some(c @ ('"' | '\\' | '$' | '`')) => {
                                chars.next();
                                word.push(c);
                            }
                            Some('\n') => {
                                chars.next();
                            }
                            _ => word.push('\\'),
                        },
                        Some((i, '$')) => {
                            refuse_dollar(i, chars.peek().map(|&(_, c)| c))?;
                            word.push('$');
                        }
                        Some((i, '`')) => {
                            return Err(shell_feature(i, "`", "command substitution"))
                        }
                        Some((_, c)) => word.push(c),
                        None => {
                            return Err(format!("unterminated \" quote from column {}", at + 1))
                        }
                    }
                }
            }
            '\\' => match chars.next() {
                Some((_, '\n')) => {}
                Some((_, c)) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err("a trailing \\ escapes nothing".into()),
            },
            '\n' | '\r' => {
                return Err(shell_feature(at, "a line break", "a command separator"));
            }
            ';' => return Err(shell_feature(at, ";", "a command separator")),
            '|' => return Err(shell_feature(at, "|", "a pipe")),
            '&' => return Err(shell_feature(at, "&", "`&&` or running in the background")),
            '>' | '<' => return Err(shell_feature(at, &c.to_string(), "a redirection")),
            '`' => return Err(shell_feature(at, "`", "command substitution")),
            '(' | ')' => return Err(shell_feature(at, &c.to_string(), "a subshell")),
            '#' if !in_word => return Err(shell_feature(at, "#", "a comment")),
            '$' => {
                refuse_dollar(at, chars.peek().map(|&(_, c)| c))?;
                in_word = true;
                word.push('$');
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// `$` is literal to a shell only when no name, `{` or `(` follows it.
fn refuse_dollar(at: usize, next: Option<char>) -> Result<(), String> {
    match next {
        Some('(') => Err(shell_feature(at, "$(", "command substitution")),
        Some('{') => Err(shell_feature(at, "${", "variable expansion")),
        Some(c) if c.is_ascii_alphanumeric() || "_@*#?$!-".contains(c) => {
            Err(shell_feature(at, &format!("${c}"), "variable expansion"))
        }
        _ => Ok(()),
    }
}

fn shell_feature(at: usize, what: &str, meaning: &str) -> String {
    format!(
        "{what} at column {} is {meaning}: the loadtester runs one hey command without a shell \
         (quote it if it is part of an argument)",
        at + 1
    )
}

/// One `hey` command, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Hey {
    pub url: Url,
    pub method: Method,
    /// In hey's precedence: `-T`, then each `-H` (the last of a name wins), then `-A`,
    /// `-host`, `User-Agent`.
    pub headers: HeaderMap,
    pub body: Option<String>,
    pub basic_auth: Option<(String, String)>,
    /// `-c`: workers, each sending one request at a time.
    pub concurrency: usize,
    /// Requests per worker (`-n` divided by `-c`, as hey does); `None` with `-z`.
    pub requests_per_worker: Option<u64>,
    /// `-z`: stop sending after this long.
    pub duration: Option<Duration>,
    /// `-q`: requests per second per worker.
    pub rate_per_worker: Option<f64>,
    /// `-t`: per request; `None` for `-t 0`.
    pub request_timeout: Option<Duration>,
    /// `-h2`: offer HTTP/2 to https servers (hey, too, speaks HTTP/1.1 to plain http).
    pub http2: bool,
    pub keepalive: bool,
}

/// Reads hey's command line (words as [`split_words`] gives them), the way hey's Go `flag`
/// package does: `-flag value`, `-flag=value`, one or two dashes, flags before the URL.
pub fn parse_hey(words: &[String]) -> Result<Hey, String> {
    let Some((program, args)) = words.split_first() else {
        return Err("the command is empty".into());
    };
    if program != "hey" && !program.ends_with("/hey") {
        return Err(format!(
            "`{program}` is not supported: Coalmine's loadtester runs hey commands natively \
             ({SUPPORTED}); other tools need Flagger's loadtester"
        ));
    }
    let mut method = "GET".to_string();
    let mut header_flags: Vec<&str> = Vec::new();
    let mut body = None;
    let mut accept = None;
    let mut content_type = "text/html".to_string();
    let mut auth = None;
    let mut host = None;
    let mut agent = None;
    let mut concurrency: i64 = 50;
    let mut requests: i64 = 200;
    let mut rate = 0f64;
    let mut timeout_secs: i64 = 20;
    let mut duration = Duration::ZERO;
    let mut http2 = false;
    let mut keepalive = true;

    let mut rest = args.iter();
    let mut url = None;
    while let Some(word) = rest.next() {
        if word == "--" {
            url = rest.next();
            break;
        }
        let Some(flag) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
            url = Some(word);
            break;
        };
        if flag.is_empty() {
            url = Some(word); // a lone `-` is an argument to Go's flag package
            break;
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        let mut value = || -> Result<&str, String> {
            match inline {
                Some(v) => Ok(v),
                None => rest
                    .next()
                    .map(String::as_str)
                    .ok_or_else(|| format!("flag needs an argument: -{name}")),
            }
        };
        match name {
            "m" => method = value()?.to_ascii_uppercase(),
            "H" => header_flags.push(value()?),
            "d" => body = Some(value()?.to_string()),
            "A" => accept = Some(value()?.to_string()),
            "T" => content_type = value()?.to_string(),
            "a" => auth = Some(value()?.to_string()),
            "host" => host = Some(value()?.to_string()),
            "U" => agent = Some(value()?.to_string()),
            "c" => concurrency = int(name, value()?)?,
            "n" => requests = int(name, value()?)?,
            "t" => timeout_secs = int(name, value()?)?,
            "q" => {
                let v = value()?;
                rate = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| {
                        format!("-q {v:?}: not a rate (requests per second per worker)")
                    })?;
            }
            "z" => {
                let v = value()?;
                duration = parse_duration(v).map_err(|e| format!("-z: {e}"))?;
            }
            "cpus" => {
                int(name, value()?)?; // a Go runtime setting: nothing to do here
            }
            "h2" => http2 = boolean(name, inline)?,
            "disable-keepalive" => keepalive = !boolean(name, inline)?,
            // No compression is asked for, and redirects are never followed (requests go only
            // where the command says), so these hold whatever their value.
            "disable-compression" | "disable-redirects" => {
                boolean(name, inline)?;
            }
            "D" => {
                return Err(
                    "-D reads the request body from a file; the loadtester reads no files: give \
                     the body with -d"
                        .into(),
                )
            }
            "x" => {
                return Err(
                    "-x sends through a proxy; the loadtester sends only where the command's URL \
                     (mapped by --resolve) says"
                        .into(),
                )
            }
            "o" => {
                return Err(format!(
                    "-o {}: the loadtester logs hey's summary; other output formats are not \
                     supported",
                    value()?
                ))
            }
            "h" => return Err("-h is deprecated in hey: use -H \"Name: value\"".into()),
            other => {
                return Err(format!(
                    "unknown flag -{other}: the loadtester supports {SUPPORTED}"
                ))
            }
        }
    }
    let Some(url_text) = url else {
        return Err("no URL: hey [options...] <url>".into());
    };
    let extra: Vec<&str> = rest.map(String::as_str).collect();
    if !extra.is_empty() {
        return Err(format!(
            "unexpected words after the URL: {} (flags go before the URL)",
            extra.join(" ")
        ));
    }
    let url = Url::parse(url_text).map_err(|e| format!("{url_text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{url_text:?}: the URL must be http:// or https:// with a host"
        ));
    }
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("-m {method:?} is not an HTTP method"))?;

    let duration = (!duration.is_zero()).then_some(duration);
    if concurrency < 1 {
        return Err("-c cannot be smaller than 1".into());
    }
    let requests_per_worker = match duration {
        Some(_) => None,
        None if requests < 1 => return Err("-n cannot be smaller than 1".into()),
        None if requests < concurrency => return Err("-n cannot be less than -c".into()),
        // hey ignores the remainder of n / c.
        None => Some((requests / concurrency) as u64),
    };
    if timeout_secs < 0 {
        return Err("-t cannot be negative (0 is no timeout)".into());
    }

    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        header_value("-T", &content_type)?,
    );
    for h in header_flags {
        let (name, value) = split_header(h)?;
        headers.insert(name, value);
    }
    if let Some(a) = accept {
        headers.insert(http::header::ACCEPT, header_value("-A", &a)?);
    }
    if let Some(h) = host {
        headers.insert(http::header::HOST, header_value("-host", &h)?);
    }
    let agent = match (agent, headers.get(http::header::USER_AGENT)) {
        (Some(u), _) => format!("{u} {AGENT}"),
        (None, Some(h)) => format!("{} {AGENT}", h.to_str().unwrap_or_default()),
        (None, None) => AGENT.to_string(),
    };
    headers.insert(http::header::USER_AGENT, header_value("-U", &agent)?);
    let basic_auth = match auth {
        None => None,
        Some(a) => match a.split_once(':') {
            Some((user, pass)) if !user.is_empty() && !pass.is_empty() => {
                Some((user.to_string(), pass.to_string()))
            }
            _ => return Err(format!("-a {a:?}: expected username:password")),
        },
    };
    Ok(Hey {
        url,
        method,
        headers,
        body,
        basic_auth,
        concurrency: concurrency as usize,
        requests_per_worker,
        duration,
        rate_per_worker: (rate > 0.0).then_some(rate),
        request_timeout: (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs as u64)),
        http2,
        keepalive,
    })
}

fn int(name: &str, v: &str) -> Result<i64, String> {
    v.parse()
        .map_err(|_| format!("-{name} {v:?}: not a whole number"))
}

/// Go's boolean flags: `-h2` alone, or `-h2=true|false|1|0|t|f`.
fn boolean(name: &str, inline: Option<&str>) -> Result<bool, String> {
    match inline {
        None => Ok(true),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(v) => Err(format!("-{name}={v}: not true or false")),
    }
}

/// hey's `-H` form: `Name: value`, the name of letters, digits, `_` and `-`.
fn split_header(h: &str) -> Result<(HeaderName, HeaderValue), String> {
    let bad = || format!("-H {h:?}: expected \"Name: value\"");
    let (name, value) = h.split_once(':').ok_or_else(bad)?;
    let value = value.trim_start();
    if name.is_empty()
        || value.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad());
    }
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
    Ok((name, header_value("-H", value)?))
}

fn header_value(flag: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("{flag} {v:?}: not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(cmd: &str) -> Vec<String> {
        split_words(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn hey(cmd: &str) -> Hey {
        parse_hey(&words(cmd)).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn refused(cmd: &str) -> String {
        match split_words(cmd).and_then(|w| parse_hey(&w)) {
            Ok(h) => panic!("{cmd:?} was accepted: {h:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn words_follow_the_shells_quoting() {
        assert_eq!(
            words("hey -z 1m -q 10 -c 2 http://payment-service:8080/"),
            [
                "hey",
                "-z",
                "1m",
                "-q",
                "10",
                "-c",
                "2",
                "http://payment-service:8080/"
            ]
        );
        assert_eq!(
            words(r#"hey -H "X-Api-Key: a b" -d '{"a": "$x;|"}'  'http://h/?a=1&b=2'"#),
            [
                "hey",
                "-H",
                "X-Api-Key: a b",
                "-d",
                r#"{"a": "$x;|"}"#,
                "http://h/?a=1&b=2"
            ]
        );
        assert_eq!(
            words(r#"a\ b "c\"d" 'e'"f" '' x"#),
            ["a b", "c\"d", "ef", "", "x"]
        );
        assert_eq!(
            words(r#""a\nb" "\$" "cost $" x\$"#),
            [r"a\nb", "$", "cost $", "x$"]
        );
        assert_eq!(words("hey \\\n -z 1s"), ["hey", "-z", "1s"]);
        assert_eq!(words("  \t "), Vec::<String>::new());
        assert_eq!(words("http://h/*?[a]"), ["http://h/*?[a]"]);
    }

    #[test]
    fn shell_features_are_refused_with_their_column_and_meaning() {
        for (cmd, needle) in [
            (
                "hey http://h/; rm -rf /",
                "; at column 14 is a command separator",
            ),
            ("hey http://h/ | tee out", "| at column 15 is a pipe"),
            (
                "hey http://h/ && true",
                "& at column 15 is `&&` or running in the background",
            ),
            ("hey http://h/ &", "running in the background"),
            ("hey http://h/ > out", "> at column 15 is a redirection"),
            ("hey http://h/ < in", "< at column 15 is a redirection"),
            ("hey $(cat url)", "$( at column 5 is command substitution"),
            (
                "hey \"$(cat url)\"",
                "$( at column 6 is command substitution",
            ),
            ("hey `cat url`", "` at column 5 is command substitution"),
            ("hey \"`cat url`\"", "` at column 6 is command substitution"),
            ("hey $URL", "$U at column 5 is variable expansion"),
            ("hey \"${URL}\"", "${ at column 6 is variable expansion"),
            (
                "hey http://h/\nhey http://i/",
                "a line break at column 14 is a command separator",
            ),
            ("(hey http://h/)", "( at column 1 is a subshell"),
            ("hey http://h/ # load", "# at column 15 is a comment"),
            ("hey 'http://h/", "unterminated ' quote from column 5"),
            ("hey \"http://h/", "unterminated \" quote from column 5"),
            ("hey http://h/ \\", "a trailing \\ escapes nothing"),
        ] {
            let e = refused(cmd);
            assert!(e.contains(needle), "{cmd:?}: {e}");
        }
    }

    #[test]
    fn the_seeds_command_reads_as_hey_would() {
        let h = hey("hey -z 1m -q 10 -c 2 http://payment-service:8080/");
        assert_eq!(h.url.as_str(), "http://payment-service:8080/");
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.duration, Some(Duration::from_secs(60)));
        assert_eq!(h.rate_per_worker, Some(10.0));
        assert_eq!(h.concurrency, 2);
        assert_eq!(h.requests_per_worker, None, "-z ignores -n");
        assert_eq!(h.request_timeout, Some(Duration::from_secs(20)));
        assert_eq!(h.headers["content-type"], "text/html", "hey's -T default");
        assert_eq!(h.headers["user-agent"], AGENT);
        assert!(h.keepalive && !h.http2);
    }

    #[test]
    fn flags_take_gos_forms_and_heys_precedence() {
        let h = hey(
            "hey --n=30 -c=3 -m post -t 0 -q 2.5 -T application/json -d '{}' \
             -H 'Accept: a' -H 'X-A: 1' -H 'x-a: 2' -A text/plain -host api.local \
             -U probe -a user:secret -h2 -disable-keepalive -disable-redirects -cpus 4 \
             https://h:8443/pay",
        );
        assert_eq!(h.requests_per_worker, Some(10));
        assert_eq!(h.concurrency, 3);
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.request_timeout, None);
        assert_eq!(h.rate_per_worker, Some(2.5));
        assert_eq!(h.body.as_deref(), Some("{}"));
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["accept"], "text/plain", "-A wins over -H Accept");
        assert_eq!(h.headers["x-a"], "2", "the last -H of a name wins");
        assert_eq!(h.headers["host"], "api.local");
        assert_eq!(h.headers["user-agent"], format!("probe {AGENT}").as_str());
        assert_eq!(h.basic_auth, Some(("user".into(), "secret".into())));
        assert!(h.http2 && !h.keepalive);
        // hey ignores the remainder of -n / -c.
        assert_eq!(hey("hey -n 7 -c 2 http://h/").requests_per_worker, Some(3));
        assert_eq!(
            hey("hey http://h/").requests_per_worker,
            Some(4),
            "200 / 50"
        );
        assert!(hey("hey -h2=false -- http://h/").keepalive);
        assert!(!hey("hey -h2=false http://h/").http2);
        assert_eq!(
            hey("/usr/local/bin/hey -z 1h30m http://h/").duration,
            Some(Duration::from_secs(5400))
        );
    }

    #[test]
    fn what_hey_or_the_loadtester_cannot_do_is_refused_by_name() {
        for (cmd, needle) in [
            ("", "the command is empty"),
            ("ghz --insecure h:9000", "`ghz` is not supported"),
            ("curl http://h/", "`curl` is not supported"),
            ("hey -z 1s", "no URL"),
            ("hey -Z 1s http://h/", "unknown flag -Z"),
            ("hey --rate 5 http://h/", "unknown flag -rate"),
            (
                "hey -D /etc/passwd http://h/",
                "-D reads the request body from a file",
            ),
            ("hey -x proxy:3128 http://h/", "-x sends through a proxy"),
            ("hey -o csv http://h/", "-o csv"),
            ("hey -h 'A: b' http://h/", "-h is deprecated"),
            ("hey -z", "flag needs an argument: -z"),
            ("hey -z soon http://h/", "-z:"),
            ("hey -c two http://h/", "-c \"two\": not a whole number"),
            ("hey -q -1 http://h/", "-q \"-1\": not a rate"),
            ("hey -c 0 http://h/", "-c cannot be smaller than 1"),
            ("hey -n 0 http://h/", "-n cannot be smaller than 1"),
            ("hey -n 2 -c 5 http://h/", "-n cannot be less than -c"),
            ("hey -t -1 http://h/", "-t cannot be negative"),
            (
                "hey -H 'no colon' http://h/",
                "-H \"no colon\": expected \"Name: value\"",
            ),
            ("hey -H 'Bad Name: v' http://h/", "expected \"Name: value\""),
            (
                "hey -a nopass http://h/",
                "-a \"nopass\": expected username:password",
            ),
            ("hey -m 'G T' http://h/", "not an HTTP method"),
            ("hey -h2=maybe http://h/", "-h2=maybe: not true or false"),
            ("hey payment-service:8080", "must be http:// or https://"),
            ("hey ftp://h/", "must be http:// or https://"),
            (
                "hey http://h/ -z 1s",
                "unexpected words after the URL: -z 1s",
            ),
        ] {
            let e = refused(cmd);
            assert!(e.contains(needle), "{cmd:?}: {e}");
        }
    }
}
