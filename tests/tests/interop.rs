//! Other languages: department systems in Python (grpcio, on grpc-core), Node.js (grpc-js), Go
//! (grpc-go) and Java (grpc-java), built from the `.proto` files as the README says. A Python
//! provider serves a dataset on its `Serve` stream; a Python, a Node.js, a Go and a Java
//! consumer each file a demand and exchange through the broker over mutual TLS, and keep
//! working on the same channel after the broker ends their idle connection (GOAWAY;
//! `limits.rs` checks the frames themselves).

use anyhow::{bail, ensure, Context, Result};
use govshare_client::proto::{NodeRole, ShareType};
use govshare_tests::cascade::{alive_rows, publish};
use govshare_tests::provider::TestProvider;
use govshare_tests::{register, wait_until, TestBroker};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long a program may take over one step (compiling the protos is the longest).
const STEP: Duration = Duration::from_secs(60);

/// One of the programs in `tests/interop`, running under its interpreter.
struct Program {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    name: &'static str,
    /// The program's TMPDIR (Python's generated modules go there), removed with it.
    _tmp: tempfile::TempDir,
}

impl Program {
    /// Runs `script` (a file in `tests/interop`) under `interpreter`, with the `.proto`
    /// directory and then `args` as its arguments.
    fn start(interpreter: &Path, script: &'static str, args: &[&dyn AsRef<OsStr>]) -> Result<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = tokio::process::Command::new(interpreter);
        // Nothing written into the source tree.
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        cmd.arg(dir.join("interop").join(script))
            .arg(dir.join("../proto"));
        for a in args {
            cmd.arg(a);
        }
        Self::spawn(cmd, script)
    }

    /// Runs a built program with `args`.
    fn run(program: &Path, name: &'static str, args: &[&dyn AsRef<OsStr>]) -> Result<Self> {
        let mut cmd = tokio::process::Command::new(program);
        for a in args {
            cmd.arg(a);
        }
        Self::spawn(cmd, name)
    }

    fn spawn(mut cmd: tokio::process::Command, name: &'static str) -> Result<Self> {
        // Nothing left in the machine's temp dir (a program killed at the end of a test cannot
        // clean up after itself).
        let tmp = tempfile::tempdir()?;
        cmd.env("TMPDIR", tmp.path());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            lines,
            name,
            _tmp: tmp,
        })
    }

    /// The program's next line of progress.
    async fn next(&mut self) -> Result<String> {
        let name = self.name;
        match tokio::time::timeout(STEP, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("{name} ended early (its stderr is above)"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("{name} said nothing for {STEP:?}"),
        }
    }

    /// Follows a consumer script (`*_consumer.*`) step by step: who it is, its demand approved,
    /// a first answer; then, once the broker has closed its idle connection (GOAWAY, then the
    /// close), a second answer on the same channel, and a clean exit. A provider program, when
    /// given, must report answering each.
    async fn consumer_steps(
        mut self,
        broker: &TestBroker,
        consumer: &str,
        mut provider: Option<&mut Program>,
    ) -> Result<()> {
        ensure!(self.next().await? == format!("whoami {consumer}"), "WhoAmI");
        ensure!(self.next().await?.starts_with("approved "), "the demand");
        for round in ["the first Request", "the Request after the idle close"] {
            if round != "the first Request" {
                ensure!(self.next().await?.starts_with("waiting"), "waiting");
                let opened = |b: &govshare_broker::RunningBroker| {
                    (
                        b.connections_of(consumer),
                        b.connections_opened_by(consumer),
                    )
                };
                let (_, before) = broker.running().map(opened).context("broker stopped")?;
                // Closed, and either not reopened yet (grpcio, grpc-js, grpc-java open the next
                // connection for the next call) or already replaced (grpc-go 1.33 reconnects at
                // once on GOAWAY, so its count of open connections hardly ever shows zero).
                wait_until(
                    Duration::from_secs(20),
                    "the idle connection to close",
                    || async {
                        let now = broker.running().map(opened);
                        Ok(now
                            .is_some_and(|(open, n)| open == 0 || n > before)
                            .then_some(()))
                    },
                )
                .await?;
                self.stdin.write_all(b"go\n").await?;
            }
            ensure!(
                self.next().await? == "answered EXCHANGE_STATE_ANSWERED",
                "{round}, on the same channel"
            );
            if let Some(p) = provider.as_deref_mut() {
                ensure!(
                    p.next().await?.starts_with("answered "),
                    "the provider answered {round}"
                );
            }
        }
        let status = tokio::time::timeout(STEP, self.child.wait()).await??;
        ensure!(status.success(), "the consumer exited with {status}");
        Ok(())
    }
}

/// A broker that ends connections idle for a second, so that the tests see it happen.
async fn idle_broker() -> Result<TestBroker> {
    TestBroker::start_with("330000/hub", |c| {
        c.limits.idle_timeout_secs = 1;
    })
    .await
}

/// Issues and registers a department's identity; returns its directory.
async fn department(broker: &TestBroker, node: &str) -> Result<PathBuf> {
    let dir = broker.issue(node, NodeRole::Department)?;
    register(&broker.admin().await?, node, NodeRole::Department).await?;
    Ok(dir)
}

#[tokio::test]
async fn a_python_provider_and_a_python_consumer_exchange_and_call_again_after_an_idle_close(
) -> Result<()> {
    let test = "interop::a_python_provider_and_a_python_consumer_exchange_and_call_again_after_an_idle_close";
    let Some(python) = govshare_tests::python_with(
        &["grpc", "grpc_tools"],
        "install grpcio and grpcio-tools (python3 -m pip install grpcio grpcio-tools, or the \
         Debian packages python3-grpcio python3-grpc-tools)",
        test,
    )?
    else {
        return Ok(());
    };
    let broker = idle_broker().await?;
    let addr = broker.addr.to_string();
    let civil = department(&broker, "330000/civil").await?;
    let ds = publish(
        &broker.connect(&civil).await?,
        "death-registration",
        ShareType::Unconditional,
    )
    .await?;
    let mut provider = Program::start(&python, "python_provider.py", &[&addr, &civil])?;
    ensure!(
        provider.next().await? == "ready 330000/hub",
        "the provider's stream was accepted"
    );

    let consumer = "330000/pension";
    let pension = department(&broker, consumer).await?;
    Program::start(&python, "python_consumer.py", &[&addr, &pension, &ds])?
        .consumer_steps(&broker, consumer, Some(&mut provider))
        .await?;
    ensure!(
        broker.running().map(|b| b.connections_of("330000/civil")) == Some(1),
        "the provider's connection outlived the idle timeout"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_grpc_js_consumer_exchanges_and_calls_again_after_an_idle_close() -> Result<()> {
    let test = "interop::a_node_grpc_js_consumer_exchanges_and_calls_again_after_an_idle_close";
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    let Some(node) = govshare_tests::node_with(
        &["@grpc/grpc-js", "@grpc/proto-loader"],
        &dir,
        "install Node.js (Debian packages nodejs, npm) and then the pinned modules: \
         npm ci --prefix tests/interop",
        test,
    )?
    else {
        return Ok(());
    };
    consumer_with_test_provider(|addr, pension, ds| {
        Program::start(&node, "node_consumer.js", &[&addr, &pension, &ds])
    })
    .await
}

/// A broker with a Rust test provider serving one dataset, and a consumer program started by
/// `start` (given the broker's address, the consumer's identity directory and the dataset id)
/// taken through [`Program::consumer_steps`].
async fn consumer_with_test_provider(
    start: impl FnOnce(&str, &Path, &str) -> Result<Program>,
) -> Result<()> {
    let broker = idle_broker().await?;
    let addr = broker.addr.to_string();
    let civil = broker.client_for("330000/civil").await?;
    let ds = publish(&civil, "death-registration", ShareType::Unconditional).await?;
    let _provider = TestProvider::start(&civil, &[&ds], 2, "p", alive_rows()).await?;

    let consumer = "330000/pension";
    let pension = department(&broker, consumer).await?;
    start(&addr, &pension, &ds)?
        .consumer_steps(&broker, consumer, None)
        .await
}

/// Runs one build step; its stderr is the error when it fails.
fn run(cmd: &mut std::process::Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `protoc -I proto --plugin=protoc-gen-NAME=PATH --LANG_out=OUT... proto/govshare/v1/*.proto`:
/// the code of every `.proto` file, in each of `langs`, written under `out`.
fn protoc(plugin: (&str, &Path), langs: &[&str], out: &Path) -> Result<()> {
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut cmd = std::process::Command::new("protoc");
    cmd.arg("-I").arg(&protos);
    cmd.arg(format!(
        "--plugin=protoc-gen-{}={}",
        plugin.0,
        plugin.1.display()
    ));
    for lang in langs {
        cmd.arg(format!("--{lang}_out")).arg(out);
    }
    for f in std::fs::read_dir(protos.join("govshare/v1"))? {
        let f = f?.path();
        if f.extension().is_some_and(|e| e == "proto") {
            cmd.arg(f);
        }
    }
    run(&mut cmd, "protoc")
}

/// The paths of `tools` on PATH, in order; None after a loud skip naming the first one missing
/// and how to `install` it.
fn tools_or_skip(tools: &[&str], install: &str, test: &str) -> Result<Option<Vec<PathBuf>>> {
    let mut found = Vec::new();
    for tool in tools {
        let Some(path) = govshare_tests::on_path(tool) else {
            return govshare_tests::skip(test, &format!("`{tool}` is not on PATH: {install}"));
        };
        found.push(path);
    }
    Ok(Some(found))
}

/// The Debian packages the Go consumer is built from, offline: Go in GOPATH mode with the
/// packaged sources of grpc-go and protobuf-go under `/usr/share/gocode`.
const GO_PACKAGES: &str =
    "golang-go golang-google-grpc-dev golang-google-protobuf-dev protoc-gen-go-grpc protobuf-compiler";

/// Where Debian's golang-*-dev packages put their sources.
const GOCODE: &str = "/usr/share/gocode";

/// Builds `go_consumer.go` in `dir`: protoc-gen-go from its packaged source, the Go code of
/// the `.proto` files (protoc with protoc-gen-go and protoc-gen-go-grpc), then the consumer.
/// None after a loud skip when a package is missing; an error when a build step fails, for
/// that would be the `.proto` files or the consumer failing Go.
fn build_go_consumer(dir: &Path, test: &str) -> Result<Option<PathBuf>> {
    let install = format!("install the Debian packages {GO_PACKAGES}");
    if tools_or_skip(&["go", "protoc", "protoc-gen-go-grpc"], &install, test)?.is_none() {
        return Ok(None);
    }
    for pkg in [
        "google.golang.org/grpc",
        "google.golang.org/protobuf/cmd/protoc-gen-go",
    ] {
        if !Path::new(GOCODE).join("src").join(pkg).is_dir() {
            return govshare_tests::skip(
                test,
                &format!("{GOCODE}/src/{pkg} is missing: {install}"),
            );
        }
    }
    let gopath = dir.join("gopath");
    let bin = dir.join("bin");
    let go = |args: &[&dyn AsRef<OsStr>]| {
        let mut cmd = std::process::Command::new("go");
        for a in args {
            cmd.arg(a);
        }
        // Offline, from the packaged sources only, whatever the user's Go settings say.
        cmd.env("GO111MODULE", "off")
            .env("GOENV", "off")
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env(
                "GOPATH",
                std::env::join_paths([gopath.as_path(), Path::new(GOCODE)])?,
            )
            .env("GOCACHE", dir.join("cache"))
            .env("TMPDIR", dir);
        anyhow::Ok(cmd)
    };
    let protoc_gen_go = bin.join("protoc-gen-go");
    run(
        &mut go(&[
            &"build",
            &"-o",
            &protoc_gen_go,
            &"google.golang.org/protobuf/cmd/protoc-gen-go",
        ])?,
        "go build protoc-gen-go",
    )?;
    let src = gopath.join("src");
    std::fs::create_dir_all(&src)?;
    protoc(("go", &protoc_gen_go), &["go", "go-grpc"], &src)?;
    let consumer = bin.join("go_consumer");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/go_consumer.go");
    run(
        &mut go(&[&"build", &"-o", &consumer, &source])?,
        "go build go_consumer.go",
    )?;
    Ok(Some(consumer))
}

#[tokio::test]
async fn a_go_grpc_consumer_exchanges_and_calls_again_after_an_idle_close() -> Result<()> {
    let test = "interop::a_go_grpc_consumer_exchanges_and_calls_again_after_an_idle_close";
    // Built before the broker starts: the build blocks this test's thread for seconds.
    let build = tempfile::tempdir()?;
    let Some(go_consumer) = build_go_consumer(build.path(), test)? else {
        return Ok(());
    };
    consumer_with_test_provider(|addr, pension, ds| {
        Program::run(&go_consumer, "go_consumer", &[&addr, &pension, &ds])
    })
    .await
}

/// The Debian packages the Java consumer is built from, offline: a JDK, grpc-java with its
/// protoc plugin, and the jars grpc-java's Netty transport needs. TLS is OpenSSL's, through
/// netty-tcnative: Debian's Netty leaves the JDK's ALPN out, and HTTP/2 over TLS needs ALPN.
const JAVA_PACKAGES: &str = "default-jdk-headless protobuf-compiler \
     protobuf-compiler-grpc-java-plugin libgrpc-java libprotobuf-java libnetty-java \
     libnetty-tcnative-java libnetty-tcnative-jni libperfmark-java libgoogle-gson-java \
     libguava-java libjsr305-java libgeronimo-annotation-1.3-spec-java";

/// The jars in `/usr/share/java` that the Java consumer compiles and runs with. The annotation
/// jar is for the `@javax.annotation.Generated` that grpc-java 1.41's plugin writes, which the
/// JDK no longer carries.
const JAVA_JARS: &[&str] = &[
    "protobuf",
    "grpc-api",
    "grpc-context",
    "grpc-core",
    "grpc-netty",
    "grpc-protobuf",
    "grpc-protobuf-lite",
    "grpc-stub",
    "guava",
    "perfmark-api",
    "jsr305",
    "gson",
    "netty-buffer",
    "netty-codec",
    "netty-codec-http",
    "netty-codec-http2",
    "netty-codec-socks",
    "netty-common",
    "netty-handler",
    "netty-handler-proxy",
    "netty-resolver",
    "netty-transport",
    "netty-transport-native-unix-common",
    "netty-tcnative",
    "geronimo-annotation-1.3-spec",
];

/// Builds `JavaConsumer.java` in `dir` with the Java code of the `.proto` files (protoc's
/// java_out and protoc-gen-grpc-java); returns `java` and the options to run it with (class
/// path, native library path). None after a loud skip when a package is missing; an error when
/// a build step fails.
fn build_java_consumer(dir: &Path, test: &str) -> Result<Option<(PathBuf, Vec<OsString>)>> {
    let install = format!("install the Debian packages {JAVA_PACKAGES}");
    let Some(tools) = tools_or_skip(
        &["java", "javac", "protoc", "grpc_java_plugin"],
        &install,
        test,
    )?
    else {
        return Ok(None);
    };
    let [java, javac, _, plugin] = tools.as_slice() else {
        bail!("four tools asked for, {} found", tools.len());
    };
    let mut jars = Vec::new();
    for jar in JAVA_JARS {
        let path = Path::new("/usr/share/java").join(format!("{jar}.jar"));
        if !path.is_file() {
            return govshare_tests::skip(
                test,
                &format!("{} is missing: {install}", path.display()),
            );
        }
        jars.push(path);
    }
    // Netty looks for `libnetty_tcnative.so`, Debian installs `libnetty-tcnative.so`, and the
    // library refuses to load through a link that names it otherwise: a copy, then.
    let Some(tcnative) = std::fs::read_dir("/usr/lib")?
        .filter_map(|d| Some(d.ok()?.path().join("jni/libnetty-tcnative.so")))
        .find(|p| p.is_file())
    else {
        return govshare_tests::skip(test, &format!("libnetty-tcnative.so is missing: {install}"));
    };
    let jni = dir.join("jni");
    std::fs::create_dir_all(&jni)?;
    std::fs::copy(&tcnative, jni.join("libnetty_tcnative.so"))?;
    let gen = dir.join("gen");
    let classes = dir.join("classes");
    std::fs::create_dir_all(&gen)?;
    std::fs::create_dir_all(&classes)?;
    protoc(("grpc-java", plugin), &["java", "grpc-java"], &gen)?;
    let mut compile = std::process::Command::new(javac);
    compile
        .arg("-nowarn")
        .arg("-d")
        .arg(&classes)
        .arg("-cp")
        .arg(std::env::join_paths(&jars)?)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/JavaConsumer.java"));
    let mut sources = vec![gen];
    while let Some(d) = sources.pop() {
        for f in std::fs::read_dir(d)? {
            let f = f?.path();
            if f.is_dir() {
                sources.push(f);
            } else if f.extension().is_some_and(|e| e == "java") {
                compile.arg(f);
            }
        }
    }
    run(&mut compile, "javac JavaConsumer.java")?;
    let mut class_path = vec![classes];
    class_path.extend(jars);
    let mut library_path = OsString::from("-Djava.library.path=");
    library_path.push(&jni);
    let options = vec![
        "-cp".into(),
        std::env::join_paths(class_path)?,
        library_path,
    ];
    Ok(Some((java.clone(), options)))
}

#[tokio::test]
async fn a_java_grpc_consumer_exchanges_and_calls_again_after_an_idle_close() -> Result<()> {
    let test = "interop::a_java_grpc_consumer_exchanges_and_calls_again_after_an_idle_close";
    // Built before the broker starts: the build blocks this test's thread for seconds.
    let build = tempfile::tempdir()?;
    let Some((java, options)) = build_java_consumer(build.path(), test)? else {
        return Ok(());
    };
    consumer_with_test_provider(|addr, pension, ds| {
        let tail: [&dyn AsRef<OsStr>; 4] = [&"JavaConsumer", &addr, &pension, &ds];
        let args: Vec<&dyn AsRef<OsStr>> = options
            .iter()
            .map(|o| o as &dyn AsRef<OsStr>)
            .chain(tail)
            .collect();
        Program::run(&java, "JavaConsumer", &args)
    })
    .await
}
