"""coap-ws-gateway: a CoAP-to-WebSocket protocol translator."""
