# tokenrelay gateway image: `docker build -t tokenrelay . && docker run -p 50051:50051 tokenrelay`
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY generated generated
COPY server server
COPY clients clients
RUN pip install --no-cache-dir --prefix=/install '.[uvloop]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 tokenrelay
USER tokenrelay
ENV TOKENRELAY_HOST=0.0.0.0 \
    TOKENRELAY_PORT=50051
EXPOSE 50051
# SIGTERM drains: NOT_SERVING, open streams finish or get UNAVAILABLE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenrelay"]
CMD ["serve"]
