"""Headless Chromium driven over the DevTools protocol on a pipe, for the dashboard's page tests.

No port and no extra package: --remote-debugging-pipe talks on fds 3 and 4 of the child.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

from tff_medical.monitoring import dashboard


class Browser:
  """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the child).

  Networking is closed three ways: a dead proxy, a resolver that maps every host to nothing,
  and no background services; the page's own CSP forbids any fetch as well.
  """

  def __init__(self, chromium, log_path):
    self._profile = tempfile.mkdtemp(prefix='dashboard-chromium-')

    def high(fd):  # Out of the way of fds 3 and 4, which the child's pipe ends must become.
      moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
      os.close(fd)
      return moved

    child_in, self._to_child = map(high, os.pipe())
    self._from_child, child_out = map(high, os.pipe())

    def wire_pipe():
      os.dup2(child_in, 3)
      os.dup2(child_out, 4)

    self._log = open(log_path, 'wb')
    args = [chromium, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
            '--no-first-run', '--disable-background-networking', '--disable-component-update',
            '--disable-sync', '--disable-extensions', '--hide-scrollbars',
            f'--user-data-dir={self._profile}', '--proxy-server=127.0.0.1:9',
            '--host-resolver-rules=MAP * ~NOTFOUND', '--remote-debugging-pipe', 'about:blank']
    # pylint: disable-next=subprocess-popen-preexec-fn
    self.process = subprocess.Popen(args, preexec_fn=wire_pipe, close_fds=False,
                                    stdin=subprocess.DEVNULL, stdout=self._log,
                                    stderr=subprocess.STDOUT)
    os.close(child_in)
    os.close(child_out)
    self._buffer = b''
    self._next_id = 0
    self.events = []

  def _message(self, timeout):
    deadline = time.monotonic() + timeout
    while b'\0' not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError('Chromium sent nothing in time')
      if select.select([self._from_child], [], [], left)[0]:
        chunk = os.read(self._from_child, 1 << 20)
        if not chunk:
          raise EOFError(f'Chromium closed the pipe (exit {self.process.poll()})')
        self._buffer += chunk
    message, self._buffer = self._buffer.split(b'\0', 1)
    return json.loads(message)

  def send(self, method, params=None, session=None, timeout=30):
    self._next_id += 1
    message = {'id': self._next_id, 'method': method, 'params': params or {}}
    if session:
      message['sessionId'] = session
    os.write(self._to_child, json.dumps(message).encode() + b'\0')
    while True:
      reply = self._message(timeout)
      if reply.get('id') == self._next_id:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply.get('result', {})
      self.events.append(reply)

  def pump(self, seconds):
    """Collects events for `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        return
      try:
        self.events.append(self._message(left))
      except TimeoutError:
        return

  def open(self, path, width=1400, height=2400):
    """A new tab showing `path` once its self-check is written; returns the Page."""
    target = self.send('Target.createTarget', {'url': 'about:blank'})['targetId']
    session = self.send('Target.attachToTarget', {'targetId': target, 'flatten': True})[
        'sessionId']
    for domain in ('Page', 'Runtime', 'Network', 'Log'):
      self.send(f'{domain}.enable', session=session)
    self.send('Emulation.setDeviceMetricsOverride', {'width': width, 'height': height,
                                                     'deviceScaleFactor': 1, 'mobile': False},
              session=session)
    page = Page(self, session, len(self.events))
    self.send('Page.navigate', {'url': 'file://' + os.path.abspath(path)}, session=session)
    page.self_check()
    return page

  def close(self):
    try:
      self.send('Browser.close', timeout=10)
    except (OSError, EOFError, TimeoutError, RuntimeError):
      pass
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait(timeout=10)
    for fd in (self._to_child, self._from_child):
      os.close(fd)
    self._log.close()
    shutil.rmtree(self._profile, ignore_errors=True)


class Page:
  """One tab: evaluate JS, read its events, move the mouse, take a screenshot."""

  def __init__(self, browser, session, first_event):
    self._browser = browser
    self._session = session
    self._first_event = first_event

  def send(self, method, params=None):
    return self._browser.send(method, params, session=self._session)

  def evaluate(self, expression):
    result = self.send('Runtime.evaluate', {'expression': expression, 'returnByValue': True,
                                            'awaitPromise': True})
    if 'exceptionDetails' in result:
      raise AssertionError(f'{expression}: {result["exceptionDetails"]}')
    return result['result'].get('value')

  def self_check(self, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        text = self.evaluate(f"(document.getElementById('{dashboard.SELF_CHECK_ID}') || "
                             "{}).textContent || ''")
      except RuntimeError:  # The page is between two documents (navigating, reloading).
        text = ''
      if text:
        return json.loads(text)
      time.sleep(0.1)
    raise AssertionError('the page never wrote its self-check')

  def events(self, *methods):
    return [e for e in self._browser.events[self._first_event:]
            if e.get('sessionId') == self._session and e['method'] in methods]

  def problems(self):
    """Console errors and warnings, uncaught exceptions, and log entries at error level."""
    found = []
    for event in self.events('Runtime.consoleAPICalled', 'Runtime.exceptionThrown',
                             'Log.entryAdded'):
      params = event['params']
      if event['method'] == 'Runtime.exceptionThrown':
        found.append(params['exceptionDetails'])
      elif event['method'] == 'Runtime.consoleAPICalled' and params['type'] in (
          'error', 'warning', 'assert'):
        found.append(params['args'])
      elif event['method'] == 'Log.entryAdded' and params['entry']['level'] in ('error',
                                                                                'warning'):
        found.append(params['entry'])
    return found

  def requests(self):
    return [e['params']['request']['url'] for e in self.events('Network.requestWillBeSent')]

  def mouse(self, kind, x, y, buttons=0):
    self.send('Input.dispatchMouseEvent', {
        'type': kind, 'x': x, 'y': y, 'button': 'left' if kind != 'mouseMoved' else 'none',
        'buttons': buttons, 'clickCount': 1 if kind != 'mouseMoved' else 0})

  def screenshot(self, path):
    data = self.send('Page.captureScreenshot', {'format': 'png'})['data']
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(base64.b64decode(data))
