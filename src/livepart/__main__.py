from livepart.cli import app

app(prog_name="livepart")
