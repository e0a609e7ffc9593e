"""Learning-analytics pipelines: Kafka -> validated, windowed analytics with Apache Beam."""
from setuptools import find_packages, setup

# One Beam release for the whole project: the Python SDK, the Prism runner that
# scripts/stack.sh builds, and any Java job server must all be this version.
BEAM_VERSION = "2.77.0"

setup(
    name="learning-analytics-beam",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "transforms", "transforms.*", "schemas", "service"]),
    package_data={"schemas": ["registry.json", "avro/*/*.avsc", "postgres.sql"],
                  # The dashboard's page, script and style: served by the service itself (offline).
                  "service": ["static/*"]},
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "fastavro>=1.9,<2",
        "confluent-kafka>=2.3,<3",
        "redis>=5,<9",
        "psycopg2-binary>=2.9,<3",
        "pyarrow>=14",
        "tenacity>=8.2,<10",
        # The analytics service (service/): HTTP, Prometheus text.
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        "prometheus-client>=0.20,<1",
        # Structured logs (--log_format json): one JSON object a line.
        "python-json-logger>=3.1,<5",
    ],
    # selenium drives Debian's chromium/chromedriver (scripts/install_browser.sh), never a downloaded browser.
    extras_require={"test": ["pytest>=8", "httpx>=0.27,<1", "selenium>=4.15,<5", "psutil>=5.9,<8"]},
    # The same commands as `python -m pipelines.streaming` (and .replay,
    # .recover_dead_letters), on the PATH once the package is installed.
    entry_points={"console_scripts": [
        "learning-analytics-streaming = pipelines.streaming:main",
        "learning-analytics-replay = pipelines.replay:main",
        "learning-analytics-recover-dead-letters = pipelines.recover_dead_letters:main",
    ]},
)
