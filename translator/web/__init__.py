"""The web side: the websockets server (`server`) and the plain HTTP on its port (`front`)."""
