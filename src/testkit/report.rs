//! Test results: one line per test on the terminal, a closing `N passed, N failed`,
//! and the JUnit XML that CI systems read.

use std::fmt::Write as _;
use std::time::Duration;

/// Why a test failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `file:line` in the test file, when known.
    pub location: Option<String>,
    pub message: String,
    pub expected: Option<String>,
    pub actual: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub time: Duration,
    pub failure: Option<Failure>,
}

/// The results of one test file; `load_error` when the file itself did not run.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub path: String,
    pub results: Vec<TestResult>,
    pub load_error: Option<Failure>,
}

impl FileReport {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_some()).count() + usize::from(self.load_error.is_some())
    }

    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }
}

/// The line (or lines, for a failure) printed when a test ends.
pub fn result_lines(file: &str, result: &TestResult) -> String {
    let millis = result.time.as_millis();
    match &result.failure {
        None => format!("ok   {file}: {} ({millis} ms)", result.name),
        Some(failure) => format!("FAIL {file}: {} ({millis} ms)\n{}", result.name, failure_lines(failure)),
    }
}

pub fn load_error_lines(file: &str, failure: &Failure) -> String {
    format!("FAIL {file}: the file did not run\n{}", failure_lines(failure))
}

fn failure_lines(failure: &Failure) -> String {
    let mut text = String::new();
    match &failure.location {
        Some(location) => {
            let _ = write!(text, "     {location}: {}", failure.message);
        }
        None => {
            let _ = write!(text, "     {}", failure.message);
        }
    }
    if let Some(expected) = &failure.expected {
        let _ = write!(text, "\n       expected: {expected}");
    }
    if let Some(actual) = &failure.actual {
        let _ = write!(text, "\n       actual:   {actual}");
    }
    text
}

pub fn summary(files: &[FileReport]) -> String {
    let passed: usize = files.iter().map(FileReport::passed).sum();
    let failed: usize = files.iter().map(FileReport::failed).sum();
    format!("{passed} passed, {failed} failed")
}

/// JUnit XML: one `testsuite` per file, one `testcase` per test.
pub fn junit(files: &[FileReport]) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for file in files {
        let time: f64 = file.results.iter().map(|r| r.time.as_secs_f64()).sum();
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{time:.3}\">",
            escape(&file.path),
            file.results.len() + usize::from(file.load_error.is_some()),
            file.failed()
        );
        if let Some(failure) = &file.load_error {
            write_case(&mut xml, &file.path, "(file)", Duration::ZERO, Some(failure));
        }
        for result in &file.results {
            write_case(&mut xml, &file.path, &result.name, result.time, result.failure.as_ref());
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

fn write_case(xml: &mut String, file: &str, name: &str, time: Duration, failure: Option<&Failure>) {
    let _ = write!(
        xml,
        "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
        escape(file),
        escape(name),
        time.as_secs_f64()
    );
    match failure {
        None => xml.push_str("/>\n"),
        Some(failure) => {
            let message = match &failure.location {
                Some(location) => format!("{location}: {}", failure.message),
                None => failure.message.clone(),
            };
            let _ = writeln!(
                xml,
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                escape(&message),
                escape(failure_lines(failure).trim())
            );
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_escapes_and_counts_failures() {
        let file = FileReport {
            path: "a_test.lua".into(),
            results: vec![
                TestResult { name: "passes".into(), time: Duration::from_millis(2), failure: None },
                TestResult {
                    name: "fails <b>".into(),
                    time: Duration::ZERO,
                    failure: Some(Failure {
                        location: Some("a_test.lua:3".into()),
                        message: "values differ".into(),
                        expected: Some("\"x\"".into()),
                        actual: Some("1".into()),
                    }),
                },
            ],
            load_error: None,
        };
        let xml = junit(std::slice::from_ref(&file));
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("name=\"fails &lt;b&gt;\""), "{xml}");
        assert!(xml.contains("message=\"a_test.lua:3: values differ\""), "{xml}");
        assert!(xml.contains("expected: &quot;x&quot;"), "{xml}");
        assert_eq!(summary(&[file]), "1 passed, 1 failed");
    }
}
